"""AdvMoE's pieces: the per-image MoE convolution against its float64 definition (forward and
every gradient, the straight-through router gradient included), the MoE-CNN and its dense twin,
the PGD and TRADES attacks against float64 loops and against torchattacks, and the adversarial
training command (three modes, the alternation, resume, refused configurations)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.blocks import MoEConv2d, moe_conv2d_reference
from gatezoo.eval.attacks import Normalized, pgd, robust_accuracy, trades_examples, trades_loss
from gatezoo.models import create_model
from gatezoo.train import adversarial
from gatezoo.train.core.checkpoint import load_checkpoint


def _reference_output(layer: MoEConv2d, x: torch.Tensor, indices: torch.Tensor):
    """The layer in float64 through autograd, given its choices: router logits -> softmax ->
    weights (renormalised over the k chosen; 1 + p - sg(p) for the straight-through k = 1)."""
    x64 = x.double()
    pooled = x64.mean(dim=(2, 3))
    logits = pooled @ layer.router.gate.weight.double().t()
    probs = torch.softmax(logits, -1)
    chosen = probs.gather(1, indices)
    if layer.straight_through:
        weights = 1 + chosen - chosen.detach()
    else:
        weights = chosen / chosen.sum(-1, keepdim=True)
    return moe_conv2d_reference(layer, x64, indices, weights)


@pytest.mark.parametrize("k, bias, stride, dtype", [(1, False, 1, torch.float32), (2, True, 2, torch.float32),
                                                     (1, True, 2, torch.float64), (3, False, 1, torch.bfloat16)])
def test_moe_conv_matches_float64_with_every_gradient(k, bias, stride, dtype):
    torch.manual_seed(k)
    layer = MoEConv2d(3, 5, 3, stride=stride, padding=1, num_experts=4, k=k, bias=bias, dtype=dtype)
    # a non-contiguous input of odd sizes (a transposed view)
    x = torch.randn(7, 3, 7, 9, dtype=dtype).transpose(2, 3).requires_grad_(True)
    assert not x.is_contiguous()
    y = layer(x)
    indices = layer.last_routing.indices
    assert y.shape == (7, 5, *layer.output_size(9, 7))
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _reference_output(layer, x_ref, indices)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double(), ref, **tol)
    g = torch.randn_like(ref)
    params = [p for p in (layer.weight, layer.bias, layer.router.gate.weight) if p is not None]
    got = torch.autograd.grad(y, [x, *params], g.to(dtype))
    want = torch.autograd.grad(ref, [x_ref, *params], g)
    for a, b, name in zip(got, want, ["x", "weight", "bias", "router"] if bias else ["x", "weight", "router"]):
        assert b.abs().sum() > 0, name  # every gradient is really exercised
        if dtype == torch.bfloat16:  # bf16 sums over images and positions: relative to the gradient's scale
            tol = dict(rtol=0, atol=2e-2 * float(b.abs().max()))
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_moe_conv_runs_only_the_chosen_experts_and_reports_its_routing():
    torch.manual_seed(0)
    layer = MoEConv2d(4, 6, 3, padding=1, num_experts=3, k=1)
    x = torch.randn(10, 4, 5, 5)
    calls = []
    original = layer._conv

    def spy(inp, e):
        calls.append((e, inp.shape[0]))
        return original(inp, e)

    layer._conv = spy
    layer(x)
    counts = torch.bincount(layer.last_routing.indices.view(-1), minlength=3)
    assert sorted(calls) == sorted((e, int(c)) for e, c in enumerate(counts) if c)  # each image convolved once
    assert layer.aux_loss is not None and float(layer.aux_loss.detach()) > 0  # the balance loss of this forward
    assert layer(x[:0]).shape == (0, 6, 5, 5)


@pytest.mark.parametrize("k, bias", [(1, True), (2, False)])
def test_moe_conv_traced_dense_path_equals_the_sparse_one(k, bias):
    """Under torch.compile every expert runs, the unchosen ones weighted 0: same output and gradients."""
    torch.manual_seed(0)
    layer = MoEConv2d(3, 4, 3, padding=1, stride=2, num_experts=3, k=k, bias=bias, dtype=torch.float64)
    x = torch.randn(6, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    params = [x, layer.weight, layer.router.gate.weight]
    g = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(compiled, params, g), torch.autograd.grad(eager, params, g)):
        torch.testing.assert_close(a, b)


def test_moe_conv_refuses_bad_arguments():
    with pytest.raises(ValueError, match="straight_through applies to k = 1"):
        MoEConv2d(3, 4, num_experts=4, k=2, straight_through=True)
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        MoEConv2d(3, 4, num_experts=2, k=3)
    with pytest.raises(TypeError, match="kernel_size"):
        MoEConv2d(3, 4, kernel_size=2.5)
    layer = MoEConv2d(3, 4, num_experts=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\)"):
        layer(torch.randn(2, 4, 5, 5))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.zeros(2, 3, 5, 5, dtype=torch.long))


def test_moe_cnn_with_one_full_width_expert_is_its_dense_twin():
    torch.manual_seed(0)
    dense = create_model("cnn_small", width=8, depths=[1, 2]).eval()
    moe = create_model("cnn_small_moe", width=8, depths=[1, 2], num_experts=1, ratio=1.0).eval()
    state = {}
    for name, value in dense.state_dict().items():
        key = name
        if name.endswith(("conv1.weight", "conv2.weight")) and name.startswith("blocks"):
            value = value.unsqueeze(0)  # the expert axis
        state[key] = value
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert unexpected == [] and all("router" in m for m in missing)
    x = torch.randn(3, 1, 11, 13)
    torch.testing.assert_close(moe(x), dense(x))


def test_moe_cnn_preset_costs_at_most_0_6_of_its_dense_twin():
    x = torch.randn(8, 1, 28, 28)
    dense, moe = create_model("cnn_small"), create_model("cnn_small_moe")
    ratio = adversarial.flops_per_image(moe, x) / adversarial.flops_per_image(dense, x)
    assert ratio <= 0.6
    n_dense = sum(p.numel() for p in dense.parameters())
    n_moe = sum(p.numel() for p in moe.parameters())
    assert 0.8 < n_moe / n_dense < 1.2  # 4 experts of half width: about the dense twin's parameters


def test_cnn_config_refuses_moe_fields_without_moe_and_bad_values():
    with pytest.raises(ValueError, match="num_experts apply to the MoE model only"):
        create_model("cnn_small", num_experts=8)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        create_model("cnn_small_moe", ratio=0)
    with pytest.raises(TypeError, match="k must be"):
        create_model("cnn_small_moe", k=0.5)
    with pytest.raises(ValueError, match="k must be"):
        create_model("cnn_small_moe", k=0)


# --- attacks ---------------------------------------------------------------------------------------


class _Linear(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(12, 4, dtype=dtype)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _loop(model, x0, start, objective, eps, step, steps):
    """The attack written out in float64: sign steps, projection onto the ball and [0, 1]."""
    x = torch.min(torch.max(start, x0 - eps), x0 + eps).clamp(0, 1)
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(model(x)), [x])
        x = torch.min(torch.max(x + step * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return x.detach()


def test_pgd_matches_the_float64_loop_and_stays_in_the_ball():
    model = _Linear()
    x = torch.rand(6, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    g = torch.Generator().manual_seed(5)
    got = pgd(model, x, y, eps=0.1, step_size=0.03, steps=7, generator=g)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    want = _loop(model, x, x + (2 * noise - 1) * 0.1, lambda out: F.cross_entropy(out, y, reduction="sum"), 0.1,
                 0.03, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - x).abs().max() <= 0.1 + 1e-12 and got.min() >= 0 and got.max() <= 1
    assert F.cross_entropy(model(got), y) > F.cross_entropy(model(x), y)
    assert torch.equal(pgd(model, x, y, eps=0.0, step_size=0.03, steps=3, generator=g), x)


def test_trades_examples_and_loss_match_float64():
    model = _Linear()
    x = torch.rand(5, 3, 2, 2, dtype=torch.float64)
    got = trades_examples(model, x, eps=0.2, step_size=0.05, steps=4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    clean = torch.softmax(model(x), -1).detach()

    def kl(out):
        return (clean * (clean.log() - torch.log_softmax(out, -1))).sum()

    want = _loop(model, x, x + 0.001 * noise, kl, 0.2, 0.05, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    y = torch.tensor([0, 1, 2, 3, 0])
    loss, _ = trades_loss(model, x, y, got, beta=6.0)
    p, q = torch.softmax(model(x), -1), torch.log_softmax(model(got), -1)
    want_loss = F.cross_entropy(model(x), y) + 6.0 * (p * (p.log() - q)).sum() / 5
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1, step_size=0.1, steps=1), "eps must be a finite number >= 0"),
    (dict(eps=0.1, step_size=0.0, steps=1), "step_size must be a finite number > 0"),
    (dict(eps=float("nan"), step_size=0.1, steps=1), "eps must be a finite number"),
])
def test_attacks_refuse_bad_settings(kwargs, match):
    model, x = _Linear(), torch.rand(2, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        pgd(model, x, torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match=match):
        trades_examples(model, x, **kwargs)


def test_attacks_refuse_zero_steps():
    with pytest.raises(ValueError, match="steps must be"):
        pgd(_Linear(), torch.rand(2, 3, 2, 2, dtype=torch.float64), torch.tensor([0, 1]), eps=0.1, step_size=0.1,
            steps=0)


def test_pgd_equals_torchattacks_pgd():
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    x = torch.rand(9, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    ours = pgd(model, x, y, eps=0.1, step_size=0.025, steps=10, random_start=False)
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=10, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=1e-12)


def test_robust_accuracy_counts_clean_and_attacked_hits():
    model = Normalized(_Linear(torch.float32), [0.5], [0.25])
    x = torch.rand(8, 1, 3, 4)
    y = model(x).argmax(-1)  # every clean image right
    out = robust_accuracy(model, [(x, y)], eps=0.0, step_size=0.1, steps=2)
    assert out == {"clean_acc": 1.0, "robust_acc": 1.0, "count": 8}
    out = robust_accuracy(model, [(x, y)], eps=1.0, step_size=1.0, steps=3)
    assert out["clean_acc"] == 1.0 and out["robust_acc"] < 1.0


# --- the training command ------------------------------------------------------------------------------

SMALL = ["--model_args", "{width: 4, depths: [1, 1], num_experts: 2}", "--batch_size", "16", "--eval_batch_size",
         "16", "--eval_images", "8", "--progress", "false", "--threads", "1"]
DENSE = ["--model", "cnn_small", "--mode", "dense", "--model_args", "{width: 4, depths: [1, 1]}"]


@pytest.mark.parametrize("mode", ["dense", "joint", "advmoe"])
def test_adversarial_command_trains_each_mode(mode, tiny_npz, tmp_path, capsys):
    extra = DENSE if mode == "dense" else ["--mode", mode]
    if mode == "advmoe":
        pytest.importorskip("torchattacks")
        extra = [*extra, "--torchattacks", "true"]
    argv = ["--data", str(tiny_npz), "--out", str(tmp_path), *SMALL, *extra, "--epochs", "1"]
    assert adversarial.main(argv) == 0
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["mode"] == mode and result["step"] == 4 and 0 <= result["robust_acc"] <= result["test_acc"] <= 1
    model, meta = load_checkpoint(run_dir / "last.safetensors")
    assert meta["adversarial"]["mode"] == mode and meta["task"]["name"] == "image_classification"
    assert result["flops_per_image"] > 0
    if mode == "advmoe":  # the independent attack's figure on the same images
        assert 0 <= result["torchattacks_robust_acc"] <= 1
    assert "robust" in capsys.readouterr().out


def test_advmoe_alternation_moves_routers_then_the_rest(tiny_npz, tmp_path):
    from gatezoo.train.core.config import load_config

    cfg = load_config(None, ["--data", str(tiny_npz), "--out", str(tmp_path), *SMALL], keys=adversarial.ADV_KEYS)
    run = adversarial._Run(cfg, tmp_path, torch.device("cpu"))
    psi = {id(p) for p in adversarial.router_parameters(run.model)}
    assert psi and len(run.optimizers) == 2
    x, y = next(iter(run.train.epoch(0)))
    adv = run._examples(x, y, torch.Generator().manual_seed(0))
    for which, moved_psi in ((0, True), (1, False)):
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        run._update(x, y, adv, run.optimizers[which])
        for n, p in run.model.named_parameters():
            changed = not torch.equal(before[n], p)
            if id(p) in psi:
                assert changed == moved_psi, n
            elif "weight" in n and p.dim() > 1:
                assert changed != moved_psi, n


def test_adversarial_resume_equals_an_uninterrupted_run(tiny_npz, tmp_path):
    base = ["--data", str(tiny_npz), *SMALL, "--epochs", "2", "--eval_every", "2"]
    assert adversarial.main([*base, "--out", str(tmp_path / "a")]) == 0
    assert adversarial.main([*base, "--out", str(tmp_path / "b"), "--max_steps", "2"]) == 0
    (b_dir,) = (tmp_path / "b").iterdir()
    assert adversarial.main(["--resume", str(b_dir), "--max_steps", "null"]) == 0
    (a_dir,) = (tmp_path / "a").iterdir()
    a, _ = load_checkpoint(a_dir / "last.safetensors")
    b, _ = load_checkpoint(b_dir / "last.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    ra = json.loads((a_dir / "result.json").read_text())
    rb = json.loads((b_dir / "result.json").read_text())
    assert ra["robust_acc"] == rb["robust_acc"] and ra["test_acc"] == rb["test_acc"]


@pytest.mark.parametrize("argv, match", [
    (["--eps", "-0.1"], "eps"),
    (["--train_steps", "0"], "train_steps"),
    (["--eval_steps", "0"], "eval_steps"),
    (["--train_step_size", "0"], "train_step_size must be > 0"),
    (["--mode", "dense"], "mode: dense trains a model without MoE layers"),
    (["--model", "cnn_small", "--model_args", "{width: 4}"], "mode: advmoe needs a model with MoE layers"),
    (["--mode", "joint", "--alternation", "shared"], "alternation: shared applies to mode: advmoe only"),
    (["--model_args", "{k: 0}"], "k must be"),
    (["--mode", "both"], "mode"),
])
def test_adversarial_command_refuses_bad_configs(argv, match, tiny_npz, tmp_path, capsys):
    assert adversarial.main(["--data", str(tiny_npz), "--out", str(tmp_path), "--progress", "false", *argv]) == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-made


def test_shipped_config_loads():
    import pathlib

    from gatezoo.train.core.config import load_config

    cfg = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "adversarial.yaml",
                      keys=adversarial.ADV_KEYS)
    assert (cfg["model"], cfg["mode"], cfg["objective"], cfg["eps"], cfg["eval_steps"]) == (
        "cnn_small_moe", "advmoe", "trades", 0.1, 10)
