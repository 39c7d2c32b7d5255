"""Data-parallel training under torchrun: two gloo processes on the CPU sharing each batch reach
the same parameters as one process on the whole batch (both tasks, and an MoE model whose balance
loss and load are reduced over the processes), only rank 0 writes, and batches are shared out in
contiguous, complete pieces."""

import csv
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gatezoo.train.core.config import ConfigError
from gatezoo.train.core.distributed import SINGLE, DistEnv, shard, share


def test_share_splits_rows_into_contiguous_complete_pieces():
    for rows in (2, 7, 16, 129):
        for world in (1, 2, 3):
            if rows < world:
                continue
            pieces = [share(rows, DistEnv(r, world)) for r in range(world)]
            covered = [i for p in pieces for i in range(rows)[p]]
            assert covered == list(range(rows))
            sizes = [p.stop - p.start for p in pieces]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match="a batch of 1 rows cannot be shared by 2 processes; raise batch_size"):
        share(1, DistEnv(0, 2))


def test_shard_cuts_tensors_tuples_and_dataclasses():
    @dataclasses.dataclass
    class Pair:
        a: torch.Tensor
        b: torch.Tensor

    x, y = torch.arange(10).view(5, 2), torch.arange(5)
    assert shard((x, y), SINGLE)[0] is x  # one process: untouched
    part = shard((x, y), DistEnv(1, 2))
    assert torch.equal(part[0], x[3:]) and torch.equal(part[1], y[3:])
    cut = shard(Pair(x, y), DistEnv(0, 2))
    assert isinstance(cut, Pair) and torch.equal(cut.a, x[:3]) and torch.equal(cut.b, y[:3])
    with pytest.raises(TypeError, match="cannot shard a batch of type dict"):
        shard({"x": x}, DistEnv(0, 2))


# ---------------------------------------------------------------------------------------------
# one process against two under torchrun


def _run(module, args, procs):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GATEZOO_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", module, *args]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:  # the whole tail, unabridged (an assertion's repr would cut it)
        pytest.fail(f"{' '.join(cmd)} exited with status {proc.returncode}\n--- stdout ---\n{proc.stdout[-2000:]}"
                    f"\n--- stderr ---\n{proc.stderr[-8000:]}", pytrace=False)
    return proc


def _run_dir(out):
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]  # rank 1 made no directory of its own
    return run_dir


def _assert_close_weights(one, two, rtol=1e-5):
    a, b = load_file(str(one / "last.safetensors")), load_file(str(two / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].double().abs().max())
        diff = float((a[k].double() - b[k].double()).abs().max())
        assert diff <= rtol * max(scale, 1e-12), f"{k}: max difference {diff:.3g} vs largest value {scale:.3g}"


def _rows(path, drop=("img_per_s", "tok_per_s", "seconds")):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def _assert_same_rows(one, two):
    ra, rb = _rows(one / "metrics.csv"), _rows(two / "metrics.csv")
    assert len(ra) == len(rb)
    for a, b in zip(ra, rb):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


# The key bias of attention gets a gradient that is zero in exact arithmetic (softmax ignores a
# shift common to all keys), so its float noise, amplified by Adam into steps of size lr, differs
# between any two summation orders; the models here have no qkv bias for that reason.
@pytest.mark.parametrize("model", ["vit_tiny", "vit_tiny_moe"])
def test_two_processes_reach_the_parameters_of_one_classify(tmp_path, tiny_npz, model):
    args = ["--model", model, "--model_args", "{dim: 32, depth: 2, drop: 0.0, qkv_bias: false}", "--data",
            str(tiny_npz), "--batch_size", "16", "--epochs", "2", "--eval_batch_size", "7", "--threads", "1",
            "--progress", "false"]
    _run("gatezoo.train.classify", [*args, "--out", str(tmp_path / "one")], 1)
    proc = _run("gatezoo.train.classify", [*args, "--out", str(tmp_path / "two")], 2)
    assert "2 processes" in proc.stdout
    one, two = _run_dir(tmp_path / "one"), _run_dir(tmp_path / "two")
    _assert_close_weights(one, two)
    _assert_same_rows(one, two)  # losses, accuracies and (MoE) aux loss and load reduced over the ranks
    if model == "vit_tiny_moe":
        assert "load_cv" in _rows(two / "metrics.csv")[0]


def test_two_processes_reach_the_parameters_of_one_translate(tmp_path, corpus):
    # token batches split by sentences: the two shares hold different numbers of target tokens
    args = ["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--model_args",
            "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64, dropout: 0.0, bias: false}",
            "--vocab_size", "40", "--dev_size", "10", "--test_size", "10", "--max_tokens", "200",
            "--warmup_steps", "2", "--eval_every", "4", "--dev_sentences", "5", "--max_steps", "8",
            "--final_test", "false", "--progress", "false", "--threads", "1"]
    _run("gatezoo.train.translate", [*args, "--out", str(tmp_path / "one")], 1)
    _run("gatezoo.train.translate", [*args, "--out", str(tmp_path / "two")], 2)
    one, two = _run_dir(tmp_path / "one"), _run_dir(tmp_path / "two")
    _assert_close_weights(one, two)
    _assert_same_rows(one, two)


def test_fsdp_with_a_resume_midway_reaches_the_parameters_of_one_process(tmp_path, tiny_npz):
    # FSDP2 shards the MoE model over two processes; the run stops at step 6 (snapshots at 3 and 6
    # hold the whole, gathered weights and optimizer state) and resumes under torchrun again
    args = ["--model", "vit_tiny_moe", "--model_args", "{dim: 32, depth: 2, drop: 0.0, qkv_bias: false}", "--data",
            str(tiny_npz), "--batch_size", "16", "--epochs", "2", "--grad_clip", "1.0", "--threads", "1",
            "--progress", "false"]
    _run("gatezoo.train.classify", [*args, "--out", str(tmp_path / "one")], 1)
    _run("gatezoo.train.classify", [*args, "--out", str(tmp_path / "two"), "--fsdp", "true", "--max_steps", "6",
                                    "--checkpoint_every", "3"], 2)
    two = _run_dir(tmp_path / "two")
    proc = _run("gatezoo.train.classify", ["--resume", str(two), "--max_steps", "null"], 2)
    assert "resuming" in proc.stdout and "step 6" in proc.stdout
    one = _run_dir(tmp_path / "one")
    _assert_close_weights(one, two)
    # the final row (its epoch's sums restored per process) equals the uninterrupted run's
    final_one, final_two = _rows(one / "metrics.csv")[-1], _rows(two / "metrics.csv")[-1]
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "aux_loss"):
        assert final_two[k] == pytest.approx(final_one[k], rel=1e-4), k


def test_fsdp_needs_several_processes(tmp_path, tiny_npz):
    from gatezoo.train import classify

    code = classify.main(["--model", "vit_tiny", "--data", str(tiny_npz), "--fsdp", "true", "--out", str(tmp_path)])
    assert code == 2 and not any(tmp_path.iterdir())
