"""gatezoo.stats.lasso: the weighted Lasso against scikit-learn, the l1-penalised EM at lam = 0
against plain EM, the penalty zeroing every penalised coefficient, support F1, refusals."""

import pytest
import torch

from gatezoo.stats import GaussianMoE, fit_em, voronoi_cells
from gatezoo.stats.lasso import fit_lasso_em, lasso_path, penalized_objective, support_f1, weighted_lasso

F64 = torch.float64


def _regression(n=100, p=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=F64)
    beta = torch.zeros(p, dtype=F64)
    beta[:3] = torch.tensor([2.0, -1.5, 1.0], dtype=F64)
    return x, x @ beta + 0.3 + 0.5 * torch.randn(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_lasso_is_sklearns_lasso(weighted):
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y, w = _regression()
    w = w if weighted else torch.ones_like(w)
    a, b = weighted_lasso(x, y, w, 0.1)
    # scikit-learn's objective weights by sample_weight and divides by n: weights scaled to sum to n
    ref = linear_model.Lasso(alpha=0.1, tol=1e-12, max_iter=100000).fit(x.numpy(), y.numpy(),
                                                                        sample_weight=(w / w.sum() * len(w)).numpy())
    torch.testing.assert_close(a, torch.from_numpy(ref.coef_), atol=1e-9, rtol=0)
    assert b == pytest.approx(float(ref.intercept_), abs=1e-9)
    assert int((a != 0).sum()) < 20  # the penalty zeroes some coefficients


def _mixture():
    return GaussianMoE(beta1=[[3.0, 0.0, 0.0, 0.0], [0.0] * 4], beta0=[0.0, 0.0],
                       a=[[2.0, 0.0, 0.0, -1.0], [-2.0, 1.0, 0.0, 0.0]], b=[1.0, -1.0], var=[0.1, 0.1])


def test_lasso_em_at_zero_penalty_is_plain_em():
    truth = _mixture()
    x, y = truth.sample(1500, seed=0)
    plain = fit_em(x, y, 2, init=truth, restarts=1, tol=1e-11, max_iter=2000)
    lasso = fit_lasso_em(x, y, 2, 0.0, init=truth, restarts=1, tol=1e-11, max_iter=2000)
    assert lasso.log_likelihood == pytest.approx(plain.log_likelihood, abs=1e-7)
    for name in ("a", "b", "var"):
        torch.testing.assert_close(getattr(lasso.model, name), getattr(plain.model, name), atol=1e-4, rtol=0)
    torch.testing.assert_close(lasso.model.canonical().beta1, plain.model.canonical().beta1, atol=1e-3, rtol=0)


def test_a_large_penalty_zeroes_every_penalised_coefficient_and_the_path_thins_out():
    truth = _mixture()
    x, y = truth.sample(800, seed=1)
    fits = lasso_path(x, y, 2, [10.0, 0.05, 0.005], restarts=2, max_iter=100, direction="down")
    big = fits[0].model
    assert float(big.a.abs().sum()) == 0.0 and float(big.canonical().beta1.abs().sum()) == 0.0
    nonzero = [int((f.model.a != 0).sum()) for f in fits]
    assert nonzero[0] <= nonzero[1] <= nonzero[2]
    cells = voronoi_cells(fits[1].model, truth)  # match the fitted experts to the true ones
    assert sorted(cells) == [0, 1]
    estimated = torch.stack([fits[1].model.a[cells.index(j)] for j in range(2)])
    assert support_f1(estimated.flatten(), truth.a.flatten()) >= 0.8


def test_support_f1_and_refusals():
    assert support_f1(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(2 / 3)
    assert support_f1(torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])) == 0.0
    x, y, _ = _regression()
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        fit_lasso_em(x, y, 2, -0.1)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        weighted_lasso(x, y, torch.ones(100, dtype=F64), -1.0)
    with pytest.raises(ValueError, match="lam_gate must be a finite number >= 0"):
        fit_lasso_em(x, y, 2, 0.1, lam_gate=float("nan"))
    with pytest.raises(ValueError, match="direction must be"):
        lasso_path(x, y, 2, [0.1], direction="sideways")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        fit_lasso_em(x, y, 0, 0.1)


def test_weighted_lasso_meets_the_optimality_conditions():
    x, y, w = _regression(p=12, seed=3)
    lam = 0.05
    a, b = weighted_lasso(x, y, w, lam)
    wn = w / w.sum()
    resid = y - x @ a - b
    grad = x.T @ (wn * resid)  # minus the gradient of the smooth part
    assert abs(float((wn * resid).sum())) < 1e-7  # the intercept is optimal
    active = a != 0
    torch.testing.assert_close(grad[active], lam * a[active].sign(), atol=1e-6, rtol=0)
    assert (grad[~active].abs() <= lam + 1e-6).all() and active.any() and (~active).any()


def test_penalised_em_never_lowers_its_objective_and_restarts_keep_the_best():
    truth = _mixture()
    x, y = truth.sample(400, seed=2)
    lam = 0.03
    start = fit_lasso_em(x, y, 2, lam, restarts=1, max_iter=1, seed=5).model
    values = [penalized_objective(fit_lasso_em(x, y, 2, lam, init=start, restarts=1, max_iter=it, tol=0.0), lam)
              for it in range(1, 8)]
    assert all(b >= a - 1e-10 for a, b in zip(values, values[1:]))
    several = fit_lasso_em(x, y, 2, lam, restarts=3, max_iter=60, seed=1)
    first = fit_lasso_em(x, y, 2, lam, restarts=1, max_iter=60, seed=1)  # the first of those restarts
    assert penalized_objective(several, lam) >= penalized_objective(first, lam) - 1e-12


def test_path_both_ways_keeps_the_better_objective_at_each_lam():
    truth = _mixture()
    x, y = truth.sample(300, seed=4)
    lams = [0.5, 0.05, 0.01]
    kw = dict(restarts=1, max_iter=40, seed=0)
    up, down, both = (lasso_path(x, y, 2, lams, direction=d, **kw) for d in ("up", "down", "both"))
    for lam, u, d, b in zip(lams, up, down, both):
        best = max(penalized_objective(u, lam), penalized_objective(d, lam))
        assert penalized_objective(b, lam) == pytest.approx(best, abs=1e-12)


def test_lasso_experiment_rows_and_summary(monkeypatch):
    rates = pytest.importorskip("gatezoo.stats.lasso_rates")
    with pytest.raises(ValueError, match="p must be an int >= 10"):
        rates.lasso_truth(8)
    monkeypatch.setattr(rates, "CALIBRATION_SAMPLES", 1)
    rows = rates.run_lasso([60], [], 2, restarts=1, max_iter=6, progress=False, at=(60, 12))
    consts = rates.CONSTANTS
    assert len(rows) == 3 * len(consts)
    assert all(0 <= r["f1"] <= 1 and 0 <= r["gate_f1"] <= 1 and r["a_error"] >= 0 for r in rows)
    c_star, summary = rates.summarize_lasso(rows)
    assert c_star in consts and len(summary) == 1 and summary[0]["samples"] == 2
    s = summary[0]
    measured = [r for r in rows if r["sample"] == "measured" and r["c"] == c_star]
    assert s["f1_mean"] == pytest.approx(sum(r["f1"] for r in measured) / 2)
    assert 0 <= s["best_within_3x"] <= 1 and s["best_c_ratio_geomean"] > 0
    with pytest.raises(ValueError, match="no calibration samples"):
        rates.summarize_lasso([r for r in rows if r["sample"] == "measured"])
