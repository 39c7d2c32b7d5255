"""The training commands meet a user's mistakes with one clear message and exit status 2: no
traceback, nothing written (no half-made run directory), every problem of a config at once."""

import pytest

from gatezoo.train import classify, translate


@pytest.fixture()
def files(tmp_path, tiny_npz):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(tiny_npz.read_bytes()[:300])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    (tmp_path / "a_dir").mkdir()
    return {"npz": str(tiny_npz), "truncated": str(truncated), "file": str(a_file), "dir": str(tmp_path / "a_dir"),
            "missing": str(tmp_path / "missing.npz")}


TINY = ["--model_args", "{dim: 32, depth: 1}", "--epochs", "1", "--batch_size", "16", "--progress", "false"]

CLASSIFY_CASES = {
    "config is a directory": (["--config", "{dir}"], "is a directory"),
    "out is a file": (["--model", "vit_tiny", "--data", "{npz}", "--out", "{file}"], "is a file"),
    "truncated npz": (["--model", "vit_tiny", "--data", "{truncated}"], "truncated"),
    "missing data": (["--model", "vit_tiny", "--data", "{missing}"], "missing.npz"),
    "resume of a plain folder": (["--resume", "{dir}"], "not a run directory"),
    "config and resume": (["--config", "{file}", "--resume", "{dir}"], "not both"),
    "unknown model": (["--model", "vit_tinny", "--data", "{npz}"], "vit_tinny"),
    "heads do not divide dim": (["--model", "vit_tiny", "--data", "{npz}", "--model_args.dim", "30",
                                 "--model_args.heads", "4"], "heads"),
    "patch does not divide the image": (["--model", "vit_tiny", "--data", "{npz}", "--model_args.patch_size", "3"],
                                        "patch_size"),
    "k above the experts": (["--model", "vit_tiny_moe", "--data", "{npz}", "--model_args",
                             "{num_experts: 2, moe_k: 3}"], "k"),
    "a string for a bool model arg": (["--model", "vit_tiny", "--data", "{npz}", "--model_args.qkv_bias", "'false'"],
                                      "qkv_bias"),
    "a string for a number": (["--model", "vit_tiny", "--data", "{npz}", "--lr", "fast"], "'lr' must be a number"),
    "a hyphenated option": (["--model", "vit_tiny", "--batch-size", "16"], "--batch_size"),
    "fsdp without torchrun": (["--model", "vit_tiny", "--data", "{npz}", "--fsdp", "true"], "torchrun"),
    "nonfinite rule": (["--model", "vit_tiny", "--nonfinite", "ignore"], "nonfinite"),
}


def _fill(arg, files):
    for key, value in files.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def _args(args, files, out):
    filled = [_fill(a, files) for a in args]
    return filled if "--out" in args else filled + ["--out", str(out)]


def _assert_clean_error(code, err, expected):
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and expected in err, err


@pytest.mark.parametrize("case", sorted(CLASSIFY_CASES))
def test_classify_mistakes(case, files, tmp_path, capsys):
    args, expected = CLASSIFY_CASES[case]
    out = tmp_path / "runs"
    # the case's own options after the small defaults, so that they win
    code = classify.main(_args((TINY if "--config" not in args and "--resume" not in args else []) + args, files,
                               out))
    _assert_clean_error(code, capsys.readouterr().err, expected)
    assert not out.exists() or not any(out.iterdir())  # no half-made run directory


def test_every_config_problem_in_one_message(tmp_path, capsys):
    code = classify.main(["--model", "vit_tiny", "--epochs", "0", "--lr", "fast", "--augment", "maybe", "--bogus",
                          "1", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "4 problems in the config" in err
    for part in ("'bogus'", "'epochs' must be >= 1", "'lr' must be a number", "'augment' must be true or false"):
        assert part in err
    assert not (tmp_path / "runs").exists()


def test_config_file_problems_listed_with_the_command_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: vit_tiny\nlearning_rate: 0.1\nepochs: -2\n")
    code = classify.main(["--config", str(cfg), "--batch_size", "0", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "3 problems" in err and "learning_rate" in err and "'epochs'" in err and "'batch_size'" in err


def test_resume_with_changed_model_args_is_a_clean_error(files, tmp_path, capsys):
    out = tmp_path / "runs"
    assert classify.main(["--model", "vit_tiny", "--data", files["npz"], *TINY, "--max_steps", "1",
                          "--out", str(out)]) == 0
    (run,) = out.iterdir()
    capsys.readouterr()
    code = classify.main(["--resume", str(run), "--model_args.dim", "64"])
    _assert_clean_error(code, capsys.readouterr().err, "--resume")


MT = ["--vocab_size", "40", "--dev_size", "10", "--test_size", "10", "--max_tokens", "200", "--max_steps", "1",
      "--final_test", "false", "--progress", "false"]


@pytest.mark.parametrize("case", ["missing src", "src without tgt", "config dir", "out file", "heads",
                                  "unknown key"])
def test_translate_mistakes(case, corpus, files, tmp_path, capsys):
    src, tgt = str(corpus / "train.en"), str(corpus / "train.es")
    out = tmp_path / "runs"
    args, expected = {
        "missing src": (["--src", files["missing"], "--tgt", tgt], "missing.npz"),
        "src without tgt": (["--src", src], "src and tgt go together"),
        "config dir": (["--config", files["dir"]], "is a directory"),
        "out file": (["--src", src, "--tgt", tgt, "--out", files["file"]], "is a file"),
        "heads": (["--src", src, "--tgt", tgt, "--model_args", "{dim: 30, heads: 4}"], "heads"),
        "unknown key": (["--src", src, "--tgt", tgt, "--max_token", "9"], "max_token"),
    }[case]
    if "--out" not in args:
        args = args + ["--out", str(out)]
    code = translate.main(args + (MT if "--config" not in args else []))
    _assert_clean_error(code, capsys.readouterr().err, expected)
    assert not out.exists() or not any(out.iterdir())


def test_every_model_argument_problem_in_one_message(files, tmp_path, capsys):
    code = classify.main(["--model", "vit_tiny", "--data", files["npz"], "--model_args",
                          "{dim: 30, heads: 4, patch_size: 3, qkv_bias: 'no', depth: 0}", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "4 problems" in err
    for name in ("depth", "patch_size", "heads", "qkv_bias"):
        assert name in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
