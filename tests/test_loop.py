"""The shared training loop on a toy regression task: accumulation, clipping, schedule steps,
several trainees in turns, and the contract a task must meet."""

import math

import pytest
import torch
from torch import nn

from gatezoo.train.core.config import ConfigError
from gatezoo.train.core.loop import RunningStats, Trainee, fit, steps_per_epoch


class ToyBatches:
    """Fixed batches of a linear regression problem; the order does not depend on the epoch."""

    def __init__(self, n_batches, batch_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(batch_size, 5, generator=g), torch.randn(batch_size, 1, generator=g))
                     for _ in range(n_batches)]

    def __len__(self):
        return len(self.data)

    def epoch(self, epoch, start=0):
        yield from self.data[start:]


class ToyTask:
    unit = "ex"
    score = "neg_mse"
    curves = (("mse", ("train_loss",)),)

    def __init__(self, batches):
        self.train_batches = batches
        self.seen = []  # (model id, first element of x) of every loss call

    def loss(self, model, batch):
        x, y = batch
        self.seen.append((id(model), float(x[0, 0])))
        loss = ((model(x) - y) ** 2).mean()
        return loss, len(x), {"sq": loss.detach() * len(x)}

    def train_metrics(self, stats):
        return {"train_mse": stats.total("sq") / stats.items}

    def evaluate(self, model):
        assert not model.training and not torch.is_grad_enabled()  # the loop evaluates in eval mode, no grad
        x, y = self.train_batches.data[0]
        return {"neg_mse": -float(((model(x) - y) ** 2).mean())}

    def checkpoint_info(self):
        return {"name": "toy"}


def _trainee(lr=0.1, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return Trainee("toy", model, opt, sched)


def test_accumulation_equals_the_larger_batch():
    big, small = ToyTask(ToyBatches(2, 8)), ToyTask(ToyBatches(4, 4))
    small.train_batches.data = [(x[i:i + 4], y[i:i + 4]) for x, y in big.train_batches.data for i in (0, 4)]
    a, b = _trainee(), _trainee()
    fit(big, [a], epochs=2, device=torch.device("cpu"), progress=False)
    fit(small, [b], epochs=2, device=torch.device("cpu"), accum_steps=2, progress=False)
    assert steps_per_epoch(small, 2) == steps_per_epoch(big) == 2
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert a.scheduler.last_epoch == b.scheduler.last_epoch == 4  # once per optimizer step
    assert [r["step"] for r in b.rows] == [2, 4] and b.rows[0]["epoch"] == 1.0
    assert math.isclose(a.rows[-1]["train_loss"], b.rows[-1]["train_loss"], rel_tol=1e-5)


def test_gradient_clipping_bounds_the_step():
    task = ToyTask(ToyBatches(1, 16))
    free, clipped = _trainee(lr=1.0), _trainee(lr=1.0)
    w0 = clipped.model.weight.detach().clone()
    b0 = clipped.model.bias.detach().clone()
    fit(task, [free], epochs=1, device=torch.device("cpu"), progress=False)
    fit(task, [clipped], epochs=1, device=torch.device("cpu"), grad_clip=1e-3, progress=False)
    step = torch.cat([(clipped.model.weight - w0).flatten(), clipped.model.bias - b0]).detach()
    assert float(step.norm()) == pytest.approx(1e-3, rel=1e-4)  # lr 1 times a gradient clipped to norm 1e-3
    assert not torch.equal(free.model.weight, clipped.model.weight)
    with pytest.raises(ValueError, match="grad_clip"):
        fit(task, [_trainee()], epochs=1, device=torch.device("cpu"), grad_clip=-1.0, progress=False)


def test_trainees_take_turns_on_the_same_batches():
    task = ToyTask(ToyBatches(3, 4))
    a, b = _trainee(seed=1), _trainee(seed=2)
    seen = []
    fit(task, [a, b], epochs=1, device=torch.device("cpu"), progress=False, on_eval=lambda res: seen.extend(res))
    order = [m for m, _ in task.seen]
    ida, idb = id(a.model), id(b.model)
    assert order == [ida, idb, idb, ida, ida, idb]  # who goes first rotates with the step
    xs = [x for _, x in task.seen]
    assert xs[0] == xs[1] and xs[2] == xs[3] and xs[4] == xs[5]  # same batch for both at every step
    assert [t for t, _ in seen] == [a, b] and set(seen[0][1]) >= {"train_mse", "neg_mse", "ex_per_s", "lr"}


def test_max_steps_stops_and_evaluates():
    task = ToyTask(ToyBatches(5, 4))
    t = _trainee()
    pos = fit(task, [t], epochs=3, device=torch.device("cpu"), max_steps=7, progress=False)
    assert pos["stopped"] and pos["global_step"] == 7 and pos["epoch"] == 1 and pos["step_in_epoch"] == 2
    assert [r["step"] for r in t.rows] == [5, 7] and t.rows[-1]["epoch"] == pytest.approx(1.4)


def test_running_stats():
    s = RunningStats()
    assert math.isnan(s.loss) and math.isnan(s.rate)
    s.add(2.0, 4, {"c": 3}, 0.5, timed=False)
    s.add(1.0, 4, {"c": 1}, 0.5)
    assert s.loss == 1.5 and s.total("c") == 4 and s.rate == 8.0
    s2 = RunningStats()
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()


def test_a_non_finite_loss_stops_the_run_with_a_clear_error():
    batches = ToyBatches(3, 4)
    batches.data[1][0][0, 0] = float("nan")
    t = _trainee()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="toy: non-finite training loss .* at optimizer step 2"):
        fit(ToyTask(batches), [t], epochs=1, device=torch.device("cpu"), progress=False)
    # the first step was applied, the second was not
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())
    assert any(not torch.equal(v, before[k]) for k, v in t.model.state_dict().items())


def test_nonfinite_skip_skips_the_update_and_goes_on(capsys):
    batches = ToyBatches(3, 4)
    batches.data[1][0][0, 0] = float("nan")
    scheduled = _trainee()
    fit(ToyTask(batches), [scheduled], epochs=1, device=torch.device("cpu"), progress=False, nonfinite="skip")
    assert scheduled.skipped == 1 and scheduled.scheduler.last_epoch == 3  # the schedule still advanced
    assert "non-finite training loss" in capsys.readouterr().err
    assert all(torch.isfinite(v).all() for v in scheduled.model.state_dict().values())
    t, ref = _trainee(), _trainee()
    t.scheduler = ref.scheduler = None  # a constant rate, so the updates compare one to one
    fit(ToyTask(batches), [t], epochs=1, device=torch.device("cpu"), progress=False, nonfinite="skip")
    # a run on the two good batches alone applies the same two updates (the optimizer never saw the bad one)
    good = ToyBatches(3, 4)
    good.data = [good.data[0], good.data[2]]
    fit(ToyTask(good), [ref], epochs=1, device=torch.device("cpu"), progress=False)
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, ref.model.state_dict()[k])


def test_nonfinite_must_be_stop_or_skip():
    with pytest.raises(ConfigError, match="nonfinite must be one of stop, skip"):
        fit(ToyTask(ToyBatches(1, 4)), [_trainee()], epochs=1, device=torch.device("cpu"), progress=False,
            nonfinite="ignore")


def test_eval_every_adds_evaluations_and_a_max_steps_stop_does_not_compete_for_best(tmp_path):
    task = ToyTask(ToyBatches(6, 4))
    calls = []
    t = _trainee()
    t.run_dir = tmp_path
    fit(task, [t], epochs=1, device=torch.device("cpu"), progress=False, eval_every=2, max_steps=5,
        on_eval=lambda results: calls.append(results[0][1]["step"]))
    rows = [r["step"] for r in t.rows]
    assert rows == [2, 4, 5] and calls == [2, 4]  # step 5 is the max_steps stop: no on_eval
    assert t.best == max(r["neg_mse"] for r in t.rows[:2])
    with pytest.raises(Exception, match="eval_every"):
        fit(task, [_trainee()], epochs=1, device=torch.device("cpu"), progress=False, eval_every=0)


class _MoEModel(nn.Module):
    """A linear model behind a top-2 mixture of experts (so the loop sees an auxiliary loss)."""

    def __init__(self):
        super().__init__()
        from gatezoo.blocks import MoEFeedForward

        self.moe = MoEFeedForward(5, 8, num_experts=4, k=2, balance_coef=0.5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(x + self.moe(x))


def test_moe_aux_loss_enters_the_step_and_the_load_is_logged(tmp_path):
    from gatezoo.blocks import moe_aux_loss

    task = ToyTask(ToyBatches(3, 16))
    torch.manual_seed(0)
    model = _MoEModel()
    ref = _MoEModel()
    ref.load_state_dict(model.state_dict())
    t = Trainee("moe", model, torch.optim.SGD(model.parameters(), lr=0.1), None, run_dir=tmp_path)
    fit(task, [t], epochs=1, device=torch.device("cpu"), progress=False, max_steps=1)
    # the step the loop took equals one SGD step on (task loss + the MoE layer's auxiliary loss)
    x, y = task.train_batches.data[0]
    loss = ((ref(x) - y) ** 2).mean()
    aux = moe_aux_loss(ref)
    assert aux is not None and aux > 0
    (loss + aux).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    row = t.rows[-1]
    # the logged training loss is the task's alone; the auxiliary loss and the load have columns of their own
    assert math.isclose(row["train_loss"], loss.item(), rel_tol=1e-5)
    assert math.isclose(row["aux_loss"], aux.item(), rel_tol=1e-5)
    assert 0 <= row["load_cv"] and 0 < row["min_expert_share"] <= 0.25 and row["dropped_share"] == 0.0
    lines = (tmp_path / "expert_load.csv").read_text().splitlines()
    assert lines[0] == "step,layer,expert,share" and len(lines) == 1 + 4
    assert math.isclose(sum(float(ln.split(",")[3]) for ln in lines[1:]), 1.0, rel_tol=1e-5)


def test_resume_trims_expert_load_rows_written_after_the_saved_state(tmp_path):
    from gatezoo.train.core.loop import _trim_expert_load

    path = tmp_path / "expert_load.csv"
    path.write_text("step,layer,expert,share\n10,l0,0,0.5\n10,l0,1,0.5\n20,l0,0,0.25\n20,l0,1,0.75\n")
    _trim_expert_load(path, 10)
    assert path.read_text().splitlines() == ["step,layer,expert,share", "10,l0,0,0.5", "10,l0,1,0.5"]
    _trim_expert_load(tmp_path / "absent.csv", 10)  # no file: nothing to do
