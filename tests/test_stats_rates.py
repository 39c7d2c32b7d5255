"""gatezoo.stats.distance and gatezoo.stats.rates: the Hellinger and total-variation distances
against closed forms, the slope fit on exact power laws, a tiny rate experiment from the command
line, and refused arguments."""

import csv
import math

import pytest
import torch

from gatezoo.stats import GaussianMoE
from gatezoo.stats.distance import hellinger, total_variation
from gatezoo.stats.rates import fit_slope, main, run_experiment


def _single(mean, var):
    return GaussianMoE(beta1=[[0.0]], beta0=[0.0], a=[[0.0]], b=[mean], var=[var])


def test_distances_of_two_gaussians_match_their_closed_forms():
    p, q = _single(0.0, 1.0), _single(0.7, 2.0)
    s1, s2 = 1.0, math.sqrt(2.0)
    h2 = 1 - math.sqrt(2 * s1 * s2 / (s1 ** 2 + s2 ** 2)) * math.exp(-0.7 ** 2 / (4 * (s1 ** 2 + s2 ** 2)))
    assert hellinger(p, q, n_x=10) == pytest.approx(math.sqrt(h2), rel=1e-6)
    assert hellinger(p, p, n_x=10) == pytest.approx(0.0, abs=1e-7)
    same_var = _single(0.5, 1.0)
    tv = math.erf(0.5 / (2 * math.sqrt(2)))  # 2 Phi(d / 2) - 1 for unit variances
    assert total_variation(p, same_var, n_x=10) == pytest.approx(tv, rel=1e-5)  # a kink where they cross


def test_slope_fit_recovers_an_exact_power_law():
    ns = [100, 1000, 10000]
    values = [[3 * n ** -0.5 * (1 + 0.01 * k) for k in range(5)] for n in ns]
    slope, lo, hi = fit_slope(ns, values)
    assert slope == pytest.approx(-0.5, abs=1e-12) and lo <= slope <= hi and hi - lo < 0.02
    with pytest.raises(ValueError, match="finite and > 0"):
        fit_slope(ns, [[1.0, 0.0]] * 3)


def test_rates_command_writes_rows_slopes_and_plot(tmp_path, capsys):
    out = tmp_path / "rates.csv"
    assert main(["--experiment", "overfit", "--n_min", "300", "--n_max", "1200", "--sizes", "2", "--repeats", "2",
                 "--restarts", "1", "--max_iter", "30", "--progress", "false", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 and {r["n"] for r in rows} == {"300", "1200"}
    assert all(float(r["voronoi"]) > 0 and 0 < float(r["hellinger"]) < 1 for r in rows)
    fitted = list(csv.DictReader(open(tmp_path / "rates-slopes.csv")))
    assert [f["error"] for f in fitted] == ["voronoi", "hellinger", "overfit_atoms"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "slope" in capsys.readouterr().out


def test_lasso_command_writes_rows_summary_and_plot(tmp_path, capsys, monkeypatch):
    rates = pytest.importorskip("gatezoo.stats.lasso_rates")
    monkeypatch.setattr(rates, "CALIBRATION_SAMPLES", 1)
    out = tmp_path / "lasso.csv"
    assert main(["--experiment", "lasso", "--n_min", "50", "--n_max", "100", "--sizes", "2", "--repeats", "2",
                 "--p_list", "10", "--at", "60,12", "--restarts", "1", "--max_iter", "5", "--progress", "false",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == (1 + 3 * 2) * len(rates.CONSTANTS)  # calibration + settings (50,12) (100,12) (60,10)
    summary = list(csv.DictReader(open(tmp_path / "lasso-summary.csv")))
    assert [(s["n"], s["p"]) for s in summary] == [("50", "12"), ("100", "12"), ("60", "10")]
    assert out.with_suffix(".png").stat().st_size > 0 and "c* =" in capsys.readouterr().out
    assert main(["--experiment", "lasso", "--n_min", "500", "--n_max", "100", "--out", str(out)]) == 2
    assert "n_max must be >= 500" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "experiment must be one of"),
    (dict(name="exact", n_min=0), "n_min must be an int >= 1"),
    (dict(name="exact", n_min=1000, n_max=100), "n_max must be an int >= 1000"),
    (dict(name="exact", repeats=1), "repeats must be an int >= 2"),
])
def test_rates_refuse_bad_arguments(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        run_experiment(name, progress=False, **kwargs)


def test_em_refuses_too_few_samples_for_the_parameters():
    truth = GaussianMoE(beta1=[[1.0]], beta0=[0.0], a=[[1.0]], b=[0.0], var=[1.0])
    x, y = truth.sample(3)
    from gatezoo.stats import fit_em

    with pytest.raises(ValueError, match="cannot identify"):
        fit_em(x, y, 2)
    assert torch.isfinite(x).all()


def test_logistic_rate_experiment_and_class_distance(tmp_path):
    from gatezoo.stats.distance import class_total_variation
    from gatezoo.stats.rates import EXPERIMENTS

    truth = EXPERIMENTS["logistic_modified"].truth()
    assert truth.gate == "modified" and float(truth.eta[0].abs().sum()) == 0.0  # the vanishing expert
    assert class_total_variation(truth, truth) == 0.0
    other = EXPERIMENTS["logistic_softmax"].truth()
    assert 0 < class_total_variation(truth, other) < 1
    out = tmp_path / "l.csv"
    assert main(["--experiment", "logistic_modified", "--n_min", "200", "--n_max", "800", "--sizes", "2",
                 "--repeats", "2", "--restarts", "1", "--max_iter", "20", "--progress", "false", "--out",
                 str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 and all(0 <= float(r["class_tv"]) < 1 and float(r["voronoi"]) > 0 for r in rows)


def test_topk_experiment_fits_a_hard_gate_from_the_softmax_fit(tmp_path):
    from gatezoo.stats.rates import EXPERIMENTS

    truth = EXPERIMENTS["topk1_overfit"].truth()
    assert (truth.gate, truth.top_k) == ("topk", 1)
    x, y = truth.sample(400, seed=0, x_low=0.0, x_high=1.0)
    fit = EXPERIMENTS["topk1_overfit"].fit(x, y, 3, 1, 100, 0)
    assert (fit.model.gate, fit.model.top_k, fit.model.k) == ("topk", 1, 3)
    assert fit.log_likelihood > truth.log_likelihood(x, y) - 0.05  # not stalled at the random start
