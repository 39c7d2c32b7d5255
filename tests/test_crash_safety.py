"""Crash safety of training runs: atomic snapshots with manifests, resume after SIGKILL at random
steps and inside a save, fallback from a damaged snapshot, clear errors for damaged files, and no
snapshot of a step whose loss was not finite.

The kills come from the ``GATEZOO_FAULT`` hook (:func:`gatezoo.train.core.checkpoint.fault`) in real
training subprocesses (``python -m gatezoo.train.classify`` / ``translate``) on the CPU with one
thread, so an interrupted-and-resumed run must end bit-identical to an uninterrupted one.
"""

import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gatezoo.train import classify, evaluate
from gatezoo.train.core import checkpoint as ckpt
from gatezoo.train.core.config import ConfigError
from gatezoo.train.core.loop import STATE_FILE, Trainee, fit

# ---------------------------------------------------------------------------------------------
# helpers


def _cli(module, args, fault=None):
    """Run ``python -m module args`` with one thread and ``GATEZOO_FAULT=fault`` (or none)."""
    env = {k: v for k, v in os.environ.items() if k != ckpt.FAULT_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[ckpt.FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=900)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _killed(proc):
    assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}: {proc.stderr[-3000:]}"
    return proc


def _only_dir(out):
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def _assert_same_weights(a_path, b_path):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rows(path, drop=("img_per_s", "tok_per_s", "seconds")):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def _snapshot_steps(run_dir):
    return [s for s, _ in ckpt.list_snapshots(run_dir)]


def _kill_plan(seed, first, last, every):
    """Three kills in one run: at a random optimizer step, inside the save of the snapshot after a
    second random step, and at a third random step (each later than the snapshot the previous
    kill leaves, so every kill fires)."""
    k1, k2, k3 = sorted(random.Random(seed).sample(range(first, last), 3))
    save = -(-k2 // every) * every  # the first snapshot at or after k2
    return [f"kill-at-step:{k1}", f"kill-in-save:{save}", f"kill-at-step:{k3}"]


# ---------------------------------------------------------------------------------------------
# image classification



def _classify_args(data, out):
    # 4 steps per epoch, 12 in all; dropout and augmentation on, so every RNG state matters
    return ["--model", "vit_tiny", "--model_args.dim", "32", "--model_args.depth", "1", "--model_args.drop", "0.1",
            "--augment", "true", "--data", str(data), "--out", str(out), "--batch_size", "16", "--epochs", "3",
            "--lr", "3e-3", "--checkpoint_every", "2", "--threads", "1", "--progress", "false"]


def test_classify_killed_three_times_ends_bit_identical(tmp_path, tiny_npz, capsys):
    mod = "gatezoo.train.classify"
    _ok(_cli(mod, _classify_args(tiny_npz, tmp_path / "full")))
    full = _only_dir(tmp_path / "full")
    faults = _kill_plan(seed=15, first=3, last=12, every=2)
    _killed(_cli(mod, _classify_args(tiny_npz, tmp_path / "part"), fault=faults[0]))
    run = _only_dir(tmp_path / "part")
    for fault in faults[1:]:
        _killed(_cli(mod, ["--resume", str(run)], fault=fault))
        if fault.startswith("kill-in-save"):  # the snapshot being saved is incomplete, the older ones intact
            save = int(fault.split(":")[1])
            assert (run / ckpt.SNAPSHOT_DIR / f"step-{save:08d}.partial").is_dir()
            assert save not in _snapshot_steps(run) and _snapshot_steps(run)
            for _, folder in ckpt.list_snapshots(run):
                ckpt.verify_snapshot(folder)
    # the newest snapshot's weights truncated: resume names the file and falls back to the older one
    (newest, older) = ckpt.list_snapshots(run)[:2]
    model = newest[1] / ckpt.MODEL_FILE
    model.write_bytes(model.read_bytes()[:-100])
    proc = _ok(_cli(mod, ["--resume", str(run)]))
    assert str(model) in proc.stderr and "truncated" in proc.stderr and older[1].name in proc.stderr
    _assert_same_weights(full / "last.safetensors", run / "last.safetensors")
    _assert_same_weights(full / "best.safetensors", run / "best.safetensors")
    assert _rows(full / "metrics.csv") == _rows(run / "metrics.csv")
    assert _snapshot_steps(run) == [12, 10] and not list((run / ckpt.SNAPSHOT_DIR).glob("*.partial"))
    assert ckpt.load_state(run / STATE_FILE)["position"]["global_step"] == 12

    # no snapshot intact: exit status 2, one line naming the damaged files
    for _, folder in ckpt.list_snapshots(run):
        state = folder / ckpt.STATE_FILE
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    capsys.readouterr()
    assert classify.main(["--resume", str(run), "--progress", "false", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "no snapshot" in err and "corrupt" in err
    assert all(str(folder / ckpt.STATE_FILE) in err for _, folder in ckpt.list_snapshots(run))
    assert err.count("\n") == len(ckpt.list_snapshots(run)) + 1  # a warning per snapshot, then the error


# ---------------------------------------------------------------------------------------------
# translation


def _translate_args(corpus, out):
    # dropout 0.1 (the model's default) draws from the RNG at every step
    return ["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(out),
            "--model_args", "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64, dropout: 0.1}",
            "--vocab_size", "40", "--dev_size", "10", "--test_size", "10", "--max_tokens", "200",
            "--warmup_steps", "2", "--eval_every", "4", "--checkpoint_every", "2", "--dev_sentences", "5",
            "--average_last", "2", "--max_steps", "10", "--final_test", "false", "--progress", "false",
            "--threads", "1"]


def test_translate_killed_three_times_ends_bit_identical(tmp_path, corpus):
    mod = "gatezoo.train.translate"
    _ok(_cli(mod, _translate_args(corpus, tmp_path / "full")))
    full = _only_dir(tmp_path / "full")
    faults = _kill_plan(seed=16, first=3, last=10, every=2)
    _killed(_cli(mod, _translate_args(corpus, tmp_path / "part"), fault=faults[0]))
    run = _only_dir(tmp_path / "part")
    for fault in faults[1:]:
        _killed(_cli(mod, ["--resume", str(run)], fault=fault))
    # the newest snapshot's training state corrupted (same size): resume names it and falls back
    newest = ckpt.list_snapshots(run)[0][1] / ckpt.STATE_FILE
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0x01
    newest.write_bytes(bytes(data))
    proc = _ok(_cli(mod, ["--resume", str(run)]))
    assert str(newest) in proc.stderr and "corrupt" in proc.stderr and "falling back" in proc.stderr
    for name in ("last", "best", "averaged"):
        _assert_same_weights(full / f"{name}.safetensors", run / f"{name}.safetensors")
    assert _rows(full / "metrics.csv") == _rows(run / "metrics.csv")
    assert sorted(p.name for p in (run / "avg").iterdir()) == sorted(p.name for p in (full / "avg").iterdir())
    assert _snapshot_steps(run) == [10, 8]


# ---------------------------------------------------------------------------------------------
# damaged files, NaN steps, the fault hook (in process, on a toy task)


class _Batches:
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(4, 5, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]

    def __len__(self):
        return len(self.data)

    def epoch(self, epoch, start=0):
        yield from self.data[start:]


class _Task:
    unit, score, curves = "ex", "neg_mse", (("mse", ("train_loss",)),)

    def __init__(self, batches):
        self.train_batches = batches

    def loss(self, model, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return loss, len(x), {}

    def train_metrics(self, stats):
        return {}

    def evaluate(self, model):
        x, y = self.train_batches.data[0]
        return {"neg_mse": -float(((model(x) - y) ** 2).mean())}

    def checkpoint_info(self):
        return {"name": "toy"}


def _trainee(run_dir):
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    return Trainee("toy", model, torch.optim.SGD(model.parameters(), lr=0.1), None, run_dir=run_dir)


def test_snapshots_are_pruned_and_match_their_manifest(tmp_path):
    t = _trainee(tmp_path)
    fit(_Task(_Batches(5)), [t], epochs=1, device=torch.device("cpu"), progress=False, checkpoint_every=1)
    assert _snapshot_steps(tmp_path) == [5, 4]  # the newest two; step 5 is the epoch's evaluation
    folder = ckpt.snapshot_dir(tmp_path, 5)
    manifest = ckpt.verify_snapshot(folder)
    assert manifest["step"] == 5 and manifest["format"] == ckpt.SNAPSHOT_FORMAT
    assert set(manifest["files"]) == {ckpt.MODEL_FILE, ckpt.STATE_FILE}
    assert manifest["files"][ckpt.MODEL_FILE]["size"] == (folder / ckpt.MODEL_FILE).stat().st_size
    assert (tmp_path / STATE_FILE).read_bytes() == (folder / ckpt.STATE_FILE).read_bytes()
    state = ckpt.load_state(ckpt.snapshot_dir(tmp_path, 4) / ckpt.STATE_FILE)
    assert state["position"] == {**state["position"], "epoch": 0, "step_in_epoch": 4, "global_step": 4}
    assert {"torch", "cuda", "python", "numpy"} <= set(state["rng"])
    assert ckpt.read_checkpoint_metadata(ckpt.snapshot_dir(tmp_path, 4) / ckpt.MODEL_FILE)["step"] == 4
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    # a missing manifest or file is named
    (ckpt.snapshot_dir(tmp_path, 4) / ckpt.MODEL_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="step-00000004.model.safetensors: missing"):
        ckpt.verify_snapshot(ckpt.snapshot_dir(tmp_path, 4))
    (folder / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest.json: missing"):
        ckpt.verify_snapshot(folder)


def test_no_snapshot_of_a_step_with_a_non_finite_loss(tmp_path):
    batches = _Batches(5)
    batches.data[2][0][0, 0] = float("nan")  # the third step's loss is NaN
    t = _trainee(tmp_path)
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at optimizer step 3"):
        fit(_Task(batches), [t], epochs=1, device=torch.device("cpu"), progress=False, checkpoint_every=1)
    assert _snapshot_steps(tmp_path) == [2, 1]
    for _, folder in ckpt.list_snapshots(tmp_path):
        ckpt.verify_snapshot(folder)
        assert all(torch.isfinite(v).all() for v in load_file(str(folder / ckpt.MODEL_FILE)).values())
    assert not (tmp_path / "last.safetensors").exists()  # no evaluation was reached


def test_a_run_directory_without_snapshots_resumes_from_state_pt(tmp_path):
    import shutil

    task = _Task(_Batches(4))
    t = _trainee(tmp_path)
    fit(task, [t], epochs=2, device=torch.device("cpu"), progress=False, max_steps=3)
    shutil.rmtree(tmp_path / ckpt.SNAPSHOT_DIR)  # as a run of an earlier version left it
    resumed = _trainee(tmp_path)
    pos = fit(task, [resumed], epochs=2, device=torch.device("cpu"), progress=False, resume=True)
    full = _trainee(None)
    fit(task, [full], epochs=2, device=torch.device("cpu"), progress=False)
    assert pos["global_step"] == 8 and torch.equal(resumed.model.weight, full.model.weight)
    # a state.pt of another step than last.safetensors' (a snapshot between evaluations): refused
    other = tmp_path / "b"
    other.mkdir()
    fit(task, [_trainee(other)], epochs=1, device=torch.device("cpu"), progress=False, checkpoint_every=1)
    shutil.copyfile(ckpt.snapshot_dir(other, 3) / ckpt.STATE_FILE, other / STATE_FILE)
    shutil.rmtree(other / ckpt.SNAPSHOT_DIR)
    with pytest.raises(ConfigError, match="state.pt is of step 3 but last.safetensors of step 4"):
        fit(task, [_trainee(other)], epochs=1, device=torch.device("cpu"), progress=False, resume=True)
    shutil.rmtree(other)
    with pytest.raises(ConfigError, match="no checkpoint there"):
        fit(task, [_trainee(other)], epochs=1, device=torch.device("cpu"), progress=False, resume=True)


def test_damaged_checkpoints_raise_errors_naming_the_file(tmp_path, capsys):
    t = _trainee(tmp_path)
    fit(_Task(_Batches(2)), [t], epochs=1, device=torch.device("cpu"), progress=False)
    last = tmp_path / "last.safetensors"
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="last.safetensors"):
        ckpt.load_weights(t.model, last)
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=f"{STATE_FILE}: unreadable training state"):
        ckpt.load_state(state)


def test_a_truncated_checkpoint_to_evaluate_names_the_file(tmp_path, tiny_npz, capsys):
    from gatezoo.train.core.factory import build_model

    args = {"dim": 32, "depth": 1, "img_size": 8, "in_chans": 1, "num_classes": 3}
    path = tmp_path / "last.safetensors"
    ckpt.save_checkpoint(build_model("vit_tiny", **args), path, {"model": "vit_tiny", "model_args": args})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.load_checkpoint(path)
    assert evaluate.main([str(path), "--data", str(tiny_npz)]) == 2
    assert str(path) in capsys.readouterr().err


def test_the_fault_hook_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_ENV, "kill-at-step:x")
    with pytest.raises(ConfigError, match="GATEZOO_FAULT"):
        fit(_Task(_Batches(2)), [_trainee(tmp_path)], epochs=1, device=torch.device("cpu"), progress=False)
    monkeypatch.setenv(ckpt.FAULT_ENV, "kill-at-step:99, kill-in-save:98")
    assert ckpt.faults() == [("kill-at-step", 99), ("kill-in-save", 98)]
    ckpt.fault("kill-at-step", 1)  # not this step: nothing happens
    with pytest.raises(ConfigError, match="checkpoint_every"):
        fit(_Task(_Batches(2)), [_trainee(tmp_path)], epochs=1, device=torch.device("cpu"), progress=False,
            checkpoint_every=0)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    ckpt.write_text(path, "old")
    with pytest.raises(RuntimeError), ckpt.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    assert json.loads(json.dumps(ckpt.rng_state()["python"]))  # plain values, loadable with weights_only
