"""bfloat16 autocast training on the CPU (``bf16: true``), for both tasks: the runs complete, the
loss falls, the weights stay float32 and finite, and the checkpoints load and evaluate."""

import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from gatezoo.train import classify, translate


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _float32_finite(path):
    weights = load_file(str(path))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("model", ["vit_tiny", "vit_tiny_moe", "mixer_tiny"])
def test_classify_trains_under_bf16_autocast(tmp_path, tiny_npz, model):
    code = classify.main(["--model", model, "--model_args", "{dim: 32, depth: 1}", "--data", str(tiny_npz),
                          "--batch_size", "16", "--epochs", "3", "--lr", "3e-3", "--bf16", "true", "--threads", "1",
                          "--progress", "false", "--out", str(tmp_path)])
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    rows = _rows(run_dir)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 1 / 3  # better than chance on the three classes
    _float32_finite(run_dir / "last.safetensors")


def test_translate_trains_and_decodes_under_bf16_autocast(tmp_path, corpus):
    result = translate.train(translate.load_mt_config(None, [
        "--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.es"), "--out", str(tmp_path),
        "--model_args", "{dim: 32, enc_layers: 1, dec_layers: 1, heads: 2, ffn_hidden: 64}", "--vocab_size", "40",
        "--dev_size", "10", "--test_size", "10", "--max_tokens", "200", "--warmup_steps", "4", "--eval_every", "10",
        "--dev_sentences", "5", "--epochs", "3", "--bf16", "true", "--beam_size", "2", "--progress", "false",
        "--threads", "1"]))
    rows = _rows(result["run_dir"])
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["dev_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result["test"] is not None and math.isfinite(result["test"]["bleu"])
    _float32_finite(result["run_dir"] / "last.safetensors")
