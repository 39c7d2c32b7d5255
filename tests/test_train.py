"""Training entry points on tiny synthetic data: config parsing, classify (run directory, resume),
evaluate, side-by-side, the timm peers and the shared optimizer/schedule pieces."""

import csv
import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gatezoo.models import create_model
from gatezoo.train import classify, evaluate, sidebyside
from gatezoo.train.core.checkpoint import load_checkpoint, read_checkpoint_metadata
from gatezoo.train.core.config import ConfigError, keys_help, load_config, parse_overrides
from gatezoo.train.core.factory import build_model, model_names, parse_model_spec
from gatezoo.train.core.optim import inverse_sqrt, param_groups, warmup_cosine
from gatezoo.train.data import images as gdata

TINY = ["--model_args.dim", "32", "--model_args.depth", "1"]



def _run(tmp_path, tiny_npz, *extra, model="vit_tiny"):
    argv = ["--model", model, "--data", str(tiny_npz), "--out", str(tmp_path / "runs"), "--batch_size", "16",
            "--epochs", "2", "--lr", "3e-3", "--progress", "false", *TINY, *extra]
    assert classify.main(argv) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    return run_dir


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# config


def test_overrides_parse_as_yaml_with_dotted_keys(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: vit_tiny\nmodel_args: {depth: 3}\nlr: 1e-3\nepochs: 2\n")
    cfg = load_config(cfg_file, ["--model_args.dim", "64", "--batch_size=32", "--name", "null", "--bf16", "true",
                                 "--warmup_epochs", "0.5", "--max_steps", "7"])
    assert cfg["model_args"] == {"depth": 3, "dim": 64}
    assert cfg["lr"] == 1e-3 and isinstance(cfg["lr"], float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg["batch_size"] == 32 and cfg["name"] is None and cfg["bf16"] is True
    assert cfg["warmup_epochs"] == 0.5 and cfg["max_steps"] == 7 and cfg["epochs"] == 2
    assert cfg["data"] == "fashion-mnist" and cfg["seed"] == 0  # defaults
    assert load_config(cfg_file, ["--augment", "--bf16"])["bf16"] is True  # a boolean alone means true
    cfg = load_config(cfg_file, ["--model_args", "{dim: 48}"])
    assert cfg["model_args"] == {"dim": 48}
    assert parse_overrides(["--a.b", "[1, 2]", "--c=x y"]) == [("a.b", [1, 2]), ("c", "x y")]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model", "vit_tiny", "--epoch", "3"], "unknown config key 'epoch'"),
        (["--model", "vit_tiny", "--lr.x", "1"], "'lr' is not a mapping"),
        (["--model", "vit_tiny", "--epochs", "two"], "'epochs' must be a number"),
        (["--model", "vit_tiny", "--epochs", "1.5"], "'epochs' must be an integer"),
        (["--model", "vit_tiny", "--batch_size", "0"], "'batch_size' must be >= 1"),
        (["--model", "vit_tiny", "--label_smoothing", "1"], "'label_smoothing' must be < 1"),
        (["--model", "vit_tiny", "--lr", "0"], "'lr' must be > 0"),
        (["--model", "vit_tiny", "--bf16", "maybe"], "'bf16' must be true or false"),
        (["--model", "vit_tiny", "--model_args", "3"], "'model_args' must be a mapping"),
        (["--model", "vit_tiny", "--epochs"], "--epochs needs a value"),
        (["--model", "vit_tiny", "--warmup-epochs", "8"], r"underscores \(did you mean --warmup_epochs\?\)"),
        (["--model", "vit_tiny", "--no-progress", "--epochs", "1"], "now spelled --progress false"),
        (["--model", "vit_tiny", "--lr", "--epochs", "1"], "option --lr needs a value"),
        (["--model", "vit_tiny", "--schedule", "linear"], "'schedule' must be one of"),
        (["--model", "vit_tiny", "--grad_clip", "0"], "'grad_clip' must be > 0"),
        (["--model", "vit_tiny", "--accum_steps", "0"], "'accum_steps' must be >= 1"),
        (["--model", "vit_tiny", "stray"], "expected an override --key value, got 'stray'"),
        ([], "'model' is required"),
    ],
)
def test_config_errors_name_the_key(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)


def test_config_file_errors(tmp_path):
    (tmp_path / "u.yaml").write_text("model: vit_tiny\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        load_config(tmp_path / "u.yaml")
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "l.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_shipped_configs_load():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    # the classification configs (translation, adversarial, selftune: their own test files)
    other = ("transformer_mt", "adversarial", "selftune")
    names = sorted(p.stem for p in root.glob("*.yaml") if not p.stem.startswith(other))
    assert {"vit_tiny", "vit_tiny_rela", "vit_tiny_xswiglu", "mixer_tiny", "ninformer_tiny", "demo"} <= set(names)
    for name in names:  # the image configs (the translation ones: tests/test_translate.py)
        cfg = load_config(root / f"{name}.yaml")
        assert cfg["model"] in model_names()
        assert cfg["data"] == "fashion-mnist"
        if name != "demo":
            assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["weight_decay"]) == (3, 128, 1e-3, 0.05)
            assert (cfg["warmup_epochs"], cfg["label_smoothing"], cfg["seed"]) == (0.3, 0.1, 0)


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        classify.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--config" in out and "model_args.depth" in out
    for line in keys_help().splitlines()[1:]:
        assert line.split()[0] in out


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, models


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and 0 < f(19) < 0.01 and f(20) == 0.0
    values = [f(s) for s in range(4, 20)]
    assert values == sorted(values, reverse=True)
    assert warmup_cosine(0, 10)(0) == 1.0


def test_inverse_sqrt_schedule():
    f = inverse_sqrt(4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up to the peak
    assert f(15) == pytest.approx(0.5) and f(63) == pytest.approx(0.25)  # sqrt(4 / n) after it
    assert inverse_sqrt(0)(3) == pytest.approx(0.5)


def test_model_specs():
    assert parse_model_spec("vit_tiny") == ("vit_tiny", {})
    assert parse_model_spec("vit_tiny:ffn=xatglu1,depth=2, qkv_bias=false") == (
        "vit_tiny", {"ffn": "xatglu1", "depth": 2, "qkv_bias": False})
    model = build_model("vit_tiny:ffn=mlp-xatlu,depth=1", dim=32, depth=3)  # the spec's own overrides win
    assert len(model.blocks) == 1 and model.blocks[0].ffn.act.alpha is not None
    for bad in ("vit_tiny:ffn", ":depth=1", "vit_tiny:=3"):
        with pytest.raises(ValueError, match="model"):
            parse_model_spec(bad)


def test_no_weight_decay_on_biases_norms_tokens_and_positions():
    model = create_model("vit_tiny", dim=32, depth=1)
    decay, plain = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "pos_embed"} <= plain_names
    assert all(p.ndim < 2 for n, p in model.named_parameters() if n in plain_names - {"cls_token", "pos_embed"})
    assert "head.weight" in decay_names and all(p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert len(decay_names) + len(plain_names) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["timm_vit_tiny", "timm_mixer_tiny"])
def test_timm_peers(name):
    pytest.importorskip("timm")
    model = build_model(name)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    small = build_model(name, dim=32, depth=1, img_size=8, in_chans=3, num_classes=5)
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert small.embed_dim == 32 and len(small.blocks) == 1
    with pytest.raises(ValueError, match="unknown override 'bogus'"):
        build_model(name, bogus=1)


def test_timm_vit_peer_matches_the_brief():
    pytest.importorskip("timm")
    m = build_model("timm_vit_tiny")
    assert m.cls_token is not None and m.pos_embed.shape == (1, 50, 128) and len(m.blocks) == 4
    assert m.blocks[0].attn.num_heads == 4 and m.blocks[0].mlp.fc1.out_features == 512


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model must be one of .*vit_tiny.*timm_vit_tiny"):
        build_model("resnet50")


# ---------------------------------------------------------------------------------------------
# classify


def test_classify_end_to_end(tmp_path, tiny_npz, capsys):
    run_dir = _run(tmp_path, tiny_npz, "--name", "smoke", "--max_steps", "6")
    assert run_dir.name.startswith("smoke-")
    for f in ("config.yaml", "metrics.csv", "curves.png", "last.safetensors", "best.safetensors", "state.pt"):
        assert (run_dir / f).is_file(), f
    out = capsys.readouterr().out
    assert "final test accuracy:" in out

    rows = _rows(run_dir / "metrics.csv")
    assert list(rows[0]) == list(classify.METRICS)
    assert [r["step"] for r in rows] == ["4", "6"]  # one full epoch of 4 steps, then max_steps stops at 6
    assert float(rows[1]["epoch"]) == 1.5
    assert all(0 <= float(r["test_acc"]) <= 1 and math.isfinite(float(r["train_loss"])) for r in rows)

    cfg = load_config(run_dir / "config.yaml")
    assert cfg["model_args"] == {"in_chans": 1, "img_size": 8, "num_classes": 3, "dim": 32, "depth": 1}
    assert cfg["data"] == str(tiny_npz.resolve())

    meta = read_checkpoint_metadata(run_dir / "last.safetensors")
    assert meta["model"] == "vit_tiny" and meta["model_args"] == cfg["model_args"]
    assert meta["task"]["name"] == "image_classification" and meta["task"]["classes"] == ["0", "1", "2"]
    assert meta["step"] == 6 and len(meta["task"]["mean"]) == 1 and set(meta["metrics"]) == {"test_loss", "test_acc"}
    with safe_open(str(run_dir / "last.safetensors"), "pt") as f:  # raw metadata is JSON strings
        assert json.loads(f.metadata()["model_args"])["dim"] == 32

    model, _ = load_checkpoint(run_dir / "last.safetensors")  # rebuilt from the metadata alone
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_resume_gives_the_uninterrupted_result(tmp_path, tiny_npz):
    # dropout and augmentation on, so the saved RNG state and the per-batch seeds matter
    extra = ("--model_args.drop", "0.1", "--augment", "true")
    full = _run(tmp_path / "a", tiny_npz, *extra)
    part = _run(tmp_path / "b", tiny_npz, *extra, "--max_steps", "3")  # stops mid-epoch 1 (4 steps/epoch)
    assert _rows(part / "metrics.csv")[-1]["step"] == "3"
    assert classify.main(["--resume", str(part), "--max_steps", "null", "--progress", "false"]) == 0

    a, b = load_file(str(full / "last.safetensors")), load_file(str(part / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra, rb = _rows(full / "metrics.csv"), _rows(part / "metrics.csv")
    assert [r["step"] for r in rb] == ["3", "4", "8"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert ra[-1][key] == rb[-1][key], key
    # a finished run resumes to nothing more
    assert classify.main(["--resume", str(part), "--progress", "false"]) == 0
    assert len(_rows(part / "metrics.csv")) == 3


def test_classify_errors_exit_2(tmp_path, tiny_npz, capsys, monkeypatch):
    out = str(tmp_path / "runs")
    assert classify.main(["--model", "vit_tiny", "--data", str(tmp_path / "missing.npz"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "apt-get install dataset-fashion-mnist" in err
    monkeypatch.setattr(gdata, "FASHION_MNIST_DIR", tmp_path / "empty")
    assert classify.main(["--model", "vit_tiny", "--out", out]) == 2
    assert "Fashion-MNIST is not installed" in capsys.readouterr().err
    assert classify.main(["--model", "vit_tiny", "--data", str(tiny_npz), "--model_args.bogus", "1", "--out", out]) == 2
    assert "bogus" in capsys.readouterr().err
    assert classify.main(["--model", "vit_tiny", "--data", str(tiny_npz), "--model_args.num_classes", "5",
                          "--out", out]) == 2
    assert "model_args.num_classes=5 does not match" in capsys.readouterr().err
    assert classify.main(["--model", "nope", "--data", str(tiny_npz), "--out", out]) == 2
    assert "model must be one of" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # no half-made run directory
    assert classify.main(["--resume", str(tmp_path), "--progress", "false"]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_missing_data_cli_exit_code_and_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gatezoo.train.classify", "--model", "vit_tiny", "--data", str(tmp_path / "nope")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "sudo apt-get install dataset-fashion-mnist" in proc.stderr and "--data PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_checkpoint(tmp_path, tiny_npz, capsys):
    run_dir = _run(tmp_path, tiny_npz, model="ninformer_tiny")
    last = _rows(run_dir / "metrics.csv")[-1]
    capsys.readouterr()
    result = evaluate.evaluate_checkpoint(run_dir)  # data set and normalisation from the metadata
    assert result["count"] == 24 and result["model"] == "ninformer_tiny"
    assert f"{result['acc']:.6g}" == last["test_acc"] and f"{result['loss']:.6g}" == last["test_loss"]
    per_class = [a for a in result["per_class_acc"] if not math.isnan(a)]
    weighted = sum(a * n for a, n in zip(result["per_class_acc"], result["per_class_count"]) if n)
    assert len(per_class) == 3 and math.isclose(weighted / 24, result["acc"])

    assert evaluate.main([str(run_dir / "best.safetensors"), "--data", str(tiny_npz)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "per-class accuracy:" in out

    np.savez(tmp_path / "big.npz", x=np.zeros((12, 10, 10), np.uint8), y=np.arange(12) % 3)
    assert evaluate.main([str(run_dir), "--data", str(tmp_path / "big.npz")]) == 2
    assert "img_size" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert evaluate.main([str(tmp_path / "junk.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------------------------------------
# side by side


def test_sidebyside(tmp_path, tiny_npz, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "bench"
    argv = ["--models", "vit_tiny", "timm_vit_tiny", "--data", str(tiny_npz), "--epochs", "2", "--batch_size", "16",
            "--lr", "3e-3", "--model_args", "{dim: 32, depth: 1}", "--out", str(out), "--progress", "false"]
    assert sidebyside.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| model | params | test acc | train img/s |" in printed and "| timm_vit_tiny |" in printed
    rows = _rows(out / "tiny-sidebyside.csv")
    assert (out / "tiny-sidebyside.png").is_file()
    assert [(r["model"], r["epoch"]) for r in rows] == [("vit_tiny", "1"), ("timm_vit_tiny", "1"),
                                                         ("vit_tiny", "2"), ("timm_vit_tiny", "2")]
    assert all(float(r["train_img_per_s"]) > 0 and int(r["params"]) > 0 for r in rows)

    # the same model alone through classify (same seed, batches, optimizer, schedule, loss) matches
    run_dir = _run(tmp_path, tiny_npz)
    alone = _rows(run_dir / "metrics.csv")
    mine = [r for r in rows if r["model"] == "vit_tiny"]
    for a, b in zip(alone, mine):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == b[key], key


def test_sidebyside_model_specs(tmp_path, tiny_npz, capsys):
    """NAME:key=value runs variants of one preset side by side; each is the model its spec builds."""
    out = tmp_path / "bench"
    argv = ["--models", "vit_tiny", "vit_tiny:ffn=xswiglu1", "--data", str(tiny_npz), "--epochs", "1",
            "--batch_size", "16", "--model_args", "{dim: 32, depth: 1}", "--out", str(out), "--progress", "false"]
    assert sidebyside.main(argv) == 0
    rows = _rows(out / "tiny-sidebyside.csv")
    assert [r["model"] for r in rows] == ["vit_tiny", "vit_tiny:ffn=xswiglu1"]
    assert int(rows[1]["params"]) == sum(p.numel() for p in build_model(
        "vit_tiny:ffn=xswiglu1", dim=32, depth=1, img_size=8, num_classes=3).parameters())
    assert "| vit_tiny:ffn=xswiglu1 |" in capsys.readouterr().out


def test_sidebyside_moe_columns_and_expert_load(tmp_path, tiny_npz, capsys):
    """MoE models get their load columns (NaN for a dense one) and the per-expert load CSV and plot."""
    out = tmp_path / "bench"
    # num_experts in the MoE specs only: the dense vit_tiny refuses a MoE field it would ignore
    moe, soft = "vit_tiny_moe:num_experts=4", "vit_tiny_moe:router=softmax,num_experts=4"
    argv = ["--models", "vit_tiny", moe, soft, "--data", str(tiny_npz),
            "--epochs", "1", "--batch_size", "16", "--model_args", "{dim: 32, depth: 2}",
            "--out", str(out), "--progress", "false"]
    assert sidebyside.main(argv) == 0
    rows = {r["model"]: r for r in _rows(out / "tiny-sidebyside.csv")}
    assert math.isnan(float(rows["vit_tiny"]["load_cv"]))
    topk, dense = rows[moe], rows[soft]
    assert float(topk["aux_loss"]) > 0 and float(topk["load_cv"]) >= 0 and float(topk["dropped_share"]) == 0
    assert 0 < float(topk["min_expert_share"]) <= 0.25
    assert float(dense["load_cv"]) == 0 and float(dense["min_expert_share"]) == 0.25  # every expert, every token
    assert 0 < float(dense["min_weight_share"]) <= 0.25  # ... but the gate's weight is what is balanced or not
    assert 0 < float(topk["min_weight_share"]) <= 0.25
    loads = _rows(out / "tiny-expert-load.csv")
    assert {r["model"] for r in loads} == {moe, soft}
    assert len(loads) == 2 * 2 * 4  # 2 models x 2 layers x 4 experts, one evaluation
    for model in (moe, soft):
        for layer in {r["layer"] for r in loads}:
            assert math.isclose(sum(float(r["share"]) for r in loads if r["model"] == model and r["layer"] == layer),
                                1.0, rel_tol=1e-5)
    assert (out / "tiny-expert-load.png").stat().st_size > 1000
    capsys.readouterr()


def test_sidebyside_seeds(tmp_path, tiny_npz, capsys):
    """--seeds repeats the run per seed into one CSV; each seed's rows are that seed's single run."""
    out = tmp_path / "bench"
    base = ["--models", "vit_tiny", "mixer_tiny", "--data", str(tiny_npz), "--epochs", "1", "--batch_size", "16",
            "--model_args", "{dim: 32, depth: 1}", "--out", str(out), "--progress", "false"]
    assert sidebyside.main([*base, "--seeds", "3", "5"]) == 0
    printed = capsys.readouterr().out
    assert "test acc, mean ± sd over 2 seeds | per seed (3, 5)" in printed
    rows = _rows(out / "tiny-sidebyside.csv")
    assert [(r["seed"], r["model"]) for r in rows] == [("3", "vit_tiny"), ("3", "mixer_tiny"), ("5", "vit_tiny"),
                                                       ("5", "mixer_tiny")]
    assert rows[0]["train_loss"] != rows[2]["train_loss"]  # another seed, other draws and batches
    line = next(x for x in printed.splitlines() if x.startswith("| vit_tiny |"))
    accs = [float(r["test_acc"]) for r in rows if r["model"] == "vit_tiny"]
    mean, sd = statistics.mean(accs), statistics.stdev(accs)
    assert f"| {mean:.4f} ± {sd:.4f} | {accs[0]:.4f} / {accs[1]:.4f} |" in line

    # --summary joins CSVs of separate runs (here the two seeds split in two files) into the same figures
    seed3, seed5 = tmp_path / "s3.csv", tmp_path / "s5.csv"
    sidebyside.write_csv([r for r in sidebyside.read_csv([out / "tiny-sidebyside.csv"]) if r["seed"] == 3], seed3)
    sidebyside.write_csv([r for r in sidebyside.read_csv([out / "tiny-sidebyside.csv"]) if r["seed"] == 5], seed5)
    capsys.readouterr()
    assert sidebyside.main(["--summary", str(seed3), str(seed5), "--merged", str(tmp_path / "all.csv")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| vit_tiny |"))
    assert f"| {mean:.4f} ± {sd:.4f} | 3, 5 | {accs[0]:.4f} / {accs[1]:.4f} |" in line
    assert _rows(tmp_path / "all.csv") == rows and (tmp_path / "all.png").is_file()
    assert sidebyside.main(["--summary", str(tmp_path / "none.csv")]) == 2
    assert "no CSV at" in capsys.readouterr().err
    # --pairs: mixer minus vit, seed by seed, in points
    m_accs = [float(r["test_acc"]) for r in rows if r["model"] == "mixer_tiny"]
    diffs = [100 * (m - v) for m, v in zip(m_accs, accs)]
    assert sidebyside.main(["--summary", str(seed3), str(seed5), "--pairs", "mixer_tiny", "vit_tiny"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| mixer_tiny − vit_tiny |"))
    assert f"| 3, 5 | {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} |" in line
    assert sidebyside.main(["--summary", str(seed3), "--pairs", "mixer_tiny"]) == 2
    assert "in pairs" in capsys.readouterr().err
    assert sidebyside.main(["--summary", str(seed3), "--pairs", "mixer_tiny", "timm_vit_tiny"]) == 2
    assert "no rows for model 'timm_vit_tiny'" in capsys.readouterr().err
    assert sidebyside.main([*base, "--seed", "5"]) == 0
    single = _rows(out / "tiny-sidebyside.csv")
    for a, b in zip(single, rows[2:]):
        for key in ("model", "seed", "train_loss", "test_loss", "test_acc"):
            assert a[key] == b[key], key

    capsys.readouterr()
    assert sidebyside.main([*base, "--seeds", "1", "1"]) == 2
    assert "each once" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="seed"):
        sidebyside.run_sidebyside(["vit_tiny"], load_config(None, ["--model", "vit_tiny", "--data", str(tiny_npz),
                                                                   "--out", str(tmp_path)]), seeds=[0, "x"])
    assert sidebyside.main([*base, "--seed", "1", "--seeds", "2"]) == 2
    assert "give --seed or --seeds, not both" in capsys.readouterr().err


def test_sidebyside_same_init(tmp_path, tiny_npz, capsys):
    """Started from timm's initial weights and fed the same batches, vit_tiny follows timm's run."""
    pytest.importorskip("timm")
    out = tmp_path / "bench"
    argv = ["--models", "timm_vit_tiny", "vit_tiny", "--data", str(tiny_npz), "--epochs", "2", "--batch_size", "16",
            "--lr", "3e-3", "--model_args", "{dim: 32, depth: 1}", "--out", str(out), "--progress", "false",
            "--same_init"]
    assert sidebyside.main(argv) == 0
    rows = _rows(out / "tiny-sidebyside.csv")
    for epoch in ("1", "2"):
        ref, ours = (next(r for r in rows if r["model"] == m and r["epoch"] == epoch)
                     for m in ("timm_vit_tiny", "vit_tiny"))
        for key in ("train_loss", "test_loss"):
            assert float(ours[key]) == pytest.approx(float(ref[key]), rel=1e-4), (epoch, key)
        assert ours["test_acc"] == ref["test_acc"]
    # without --same_init the draws differ, and so do the first-epoch losses
    assert sidebyside.main(argv[:-1]) == 0
    rows = _rows(out / "tiny-sidebyside.csv")
    assert rows[0]["train_loss"] != rows[1]["train_loss"]

    base = ["--data", str(tiny_npz), "--out", str(tmp_path), "--progress", "false", "--model_args",
            "{dim: 32, depth: 1}", "--same_init"]
    capsys.readouterr()
    assert sidebyside.main(["--models", "vit_tiny", *base]) == 2
    assert "needs the peer timm_vit_tiny" in capsys.readouterr().err
    assert sidebyside.main(["--models", "timm_vit_tiny", *base]) == 2
    assert "at least one gatezoo ViT" in capsys.readouterr().err
    assert sidebyside.main(["--models", "timm_vit_tiny", "vit_tiny_rela", *base]) == 2
    assert "vit_tiny_rela cannot start from timm_vit_tiny's weights" in capsys.readouterr().err
    assert sidebyside.main(["--models", "timm_vit_tiny", "mixer_tiny", *base]) == 2
    assert "mixer_tiny cannot start" in capsys.readouterr().err


def test_sidebyside_errors(tmp_path, tiny_npz, capsys):
    base = ["--data", str(tiny_npz), "--out", str(tmp_path), "--progress", "false"]
    assert sidebyside.main(["--models", "vit_tiny", "vit_tiny", *base]) == 2
    assert "each name once" in capsys.readouterr().err
    assert sidebyside.main(["--models", "vit_tiny", "--lr", "-1", *base]) == 2
    assert "'lr' must be >= 0" in capsys.readouterr().err
    assert sidebyside.main(["--models", "vit_tiny", "--model_args", "[1]", *base]) == 2
    assert "'model_args' must be a mapping" in capsys.readouterr().err
    assert sidebyside.main(["--models", "vit_tiny", "--weight-decay", "0.1", *base]) == 2
    assert "did you mean --weight_decay?" in capsys.readouterr().err
    assert sidebyside.main(["--models", "vit_tiny:ffn", *base]) == 2
    assert "expected NAME or NAME:key=value" in capsys.readouterr().err
    assert sidebyside.main(["--models", "vit_tiny:num_classes=5", *base]) == 2  # checked against the data
    assert "model_args.num_classes=5 does not match" in capsys.readouterr().err
    assert sidebyside.main(["--models", "vit_tiny", "--same-init", *base]) == 2
    assert "now spelled --same_init" in capsys.readouterr().err
    assert sidebyside.main(["--models", "vit_tiny", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
