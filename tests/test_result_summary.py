"""result_summary: runs labelled by result.json keys, mean ± sd over seeds, paired differences
to a baseline, the CSV and chart, and the refusals."""

import csv
import json

import pytest

from gatezoo.train import result_summary


def _run(root, name, **result):
    d = root / name
    d.mkdir()
    (d / "result.json").write_text(json.dumps(result))
    return str(d)


def test_result_summary_over_seeds_with_a_baseline(tmp_path, capsys):
    runs = [_run(tmp_path, "a0", mode="joint", seed=0, robust_acc=0.50, test_acc=0.80),
            _run(tmp_path, "a1", mode="joint", seed=1, robust_acc=0.54, test_acc=0.82),
            _run(tmp_path, "b0", mode="advmoe", seed=0, robust_acc=0.53, test_acc=0.79),
            _run(tmp_path, "b1", mode="advmoe", seed=1, robust_acc=0.55, test_acc=0.80)]
    out = tmp_path / "bench" / "adv.csv"
    assert result_summary.main([*runs, "--group", "mode", "--metrics", "robust_acc", "test_acc", "--baseline",
                                "joint", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    line = next(t for t in table.splitlines() if t.startswith("| `advmoe`"))
    # mean 0.54, sd 0.01414; paired deltas +0.03 and +0.01: mean 0.02, sd 0.01414
    assert "| 0, 1 | 0.54 ± 0.014 | 0.02 ± 0.014 |" in line
    rows = list(csv.DictReader(open(out)))
    assert [r["label"] for r in rows] == ["joint", "joint", "advmoe", "advmoe"]
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("argv, match", [
    (["--group", "mode", "--metrics", "nope"], "metric 'nope' is missing"),
    (["--group", "colour", "--metrics", "robust_acc"], "has no ['colour']"),
    (["--group", "mode", "--metrics", "robust_acc", "--baseline", "dense"], "--baseline 'dense' is not one of"),
])
def test_result_summary_refuses_bad_arguments(argv, match, tmp_path, capsys):
    run = _run(tmp_path, "a", mode="joint", seed=0, robust_acc=0.5)
    assert result_summary.main([run, *argv]) == 2
    assert match in capsys.readouterr().err
    assert result_summary.main([str(tmp_path), "--group", "mode", "--metrics", "robust_acc"]) == 2
    assert "has no result.json" in capsys.readouterr().err


def test_nan_values_are_left_out_and_counted():
    from gatezoo.train.result_summary import _stats

    assert _stats([1.0, 3.0]) == "2 ± 1.4"
    assert _stats([1.0, float("nan"), 3.0]) == "2 ± 1.4 (1 of 3 NaN)"
    assert _stats([float("nan")] * 2) == "NaN (2 of 2 NaN)"
    assert _stats([5.0, float("nan")]) == "5 (1 of 2 NaN)"
