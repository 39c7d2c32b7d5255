"""The Lasso experiment: support recovery and error of the l1-penalised EM over p and lam.

    python -m gatezoo.stats.rates --experiment lasso --repeats 10

The truth is a softmax-gated Gaussian mixture of two linear experts in p dimensions
(:func:`lasso_truth`): each expert has s = 5 non-zero slopes (on different inputs), the gate
has 5 non-zero slopes, x is uniform on [-1, 1]^p and both variances are 0.25. For every setting
(n, p) and seeded sample, :func:`~gatezoo.stats.lasso.lasso_path` fits the grid ``lam = c *
sqrt(log p / n)`` (the shape of the oracle inequality's lower bound) for the constants ``c`` of
:data:`CONSTANTS` (warm-started both ways, the better penalised objective kept), the same lam on
the experts and the gate
(the estimator of the oracle inequality). Each fit is scored by

- ``f1``: the support F1 of the experts' slopes, the fitted experts matched to the true ones by
  the permutation nearest in parameters; ``gate_f1``: the same for the gate's canonical slopes;
- ``a_error``: ``||a_fitted - a_true||`` (Frobenius, matched); ``nonzero``: fitted non-zero slopes.

The constant is chosen once, before the measured samples: ``c_star`` is the constant of the
highest mean F1 over :data:`CALIBRATION_SAMPLES` calibration samples (seeds of their own) at
n = 800, p = 200. Then, on the measured samples of every setting, the summary reports the mean F1
at ``c_star``, each sample's best constant (highest F1, the smaller ``a_error`` on ties) and its
ratio to ``c_star``, and the slope of ``a_error`` at ``c_star`` against n at p = 200. The fits keep
the variances above :data:`VAR_FLOOR`.
"""

from __future__ import annotations

import math
import statistics

import torch

from .lasso import lasso_path, support_f1
from .moe import GaussianMoE

__all__ = ["CONSTANTS", "lasso_truth", "run_lasso", "summarize_lasso"]

CONSTANTS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)
"""The constants c of the lam grid ``c * sqrt(log p / n)`` (steps of about sqrt 2)."""
CALIBRATION_SAMPLES = 5
"""Samples the constant is calibrated on (at n = 800, p = 200, seeds of their own)."""
SPARSITY = 5
VAR_FLOOR = 0.01
"""The fits' lower bound on the variances (1/25 of the true 0.25): the oracle inequality assumes
variances in a compact set, and without a bound an expert with about as many inputs as samples
interpolates them, its variance and its penalty (``lam * var``) vanish and the likelihood is
unbounded."""
_F64 = torch.float64


def lasso_truth(p: int) -> GaussianMoE:
    """Two experts on p >= 10 inputs: expert slopes (3, -3, 2, -2, 2) on inputs 0-4 and the
    negatives on inputs 5-9, intercepts 1 and -1, variances 0.25; gate slopes (3, -3, 3, -3, 3)
    on inputs 0-4 for the first expert, 0 for the second."""
    if isinstance(p, bool) or not isinstance(p, int) or p < 2 * SPARSITY:
        raise ValueError(f"p must be an int >= {2 * SPARSITY}, got {p!r}")
    beta1 = torch.zeros(2, p, dtype=_F64)
    beta1[0, :SPARSITY] = torch.tensor([3.0, -3.0, 3.0, -3.0, 3.0])
    a = torch.zeros(2, p, dtype=_F64)
    a[0, :SPARSITY] = torch.tensor([3.0, -3.0, 2.0, -2.0, 2.0])
    a[1, SPARSITY:2 * SPARSITY] = -a[0, :SPARSITY]
    return GaussianMoE(beta1=beta1, beta0=[0.0, 0.0], a=a, b=[1.0, -1.0], var=[0.25, 0.25])


def _score(fitted: GaussianMoE, truth: GaussianMoE) -> dict:
    keep = (fitted.a - truth.a).norm() <= (fitted.a.flip(0) - truth.a).norm()
    a = fitted.a if keep else fitted.a.flip(0)
    gate = fitted.canonical().beta1 if keep else fitted.canonical().beta1.flip(0)
    gate = gate - gate[-1]  # the canonical form after the swap: last row 0
    return {"f1": support_f1(a.flatten(), truth.a.flatten()),
            "gate_f1": support_f1(gate[:-1].flatten(), truth.canonical().beta1[:-1].flatten()),
            "a_error": float((a - truth.a).norm()), "nonzero": int((fitted.a != 0).sum())}


def _path_rows(n: int, p: int, seed: int, restarts: int, max_iter: int, sample: str) -> list[dict]:
    truth = lasso_truth(p)
    x, y = truth.sample(n, seed=seed)
    lam0 = math.sqrt(math.log(p) / n)
    fits = lasso_path(x, y, 2, [c * lam0 for c in CONSTANTS], restarts=restarts, max_iter=max_iter, seed=seed,
                      var_floor=VAR_FLOOR)
    return [{"experiment": "lasso", "sample": sample, "n": n, "p": p, "seed": seed, "c": c, "lam": c * lam0,
             **_score(f.model, truth), "log_likelihood": f.log_likelihood, "iterations": f.iterations}
            for c, f in zip(CONSTANTS, fits)]


def settings(ns: list[int], ps: list[int], at: tuple[int, int] = (800, 200)) -> list[tuple[int, int]]:
    """The (n, p) settings: every n of ``ns`` at p = ``at[1]``, and every p of ``ps`` at n = ``at[0]``."""
    return list(dict.fromkeys([(n, at[1]) for n in ns] + [(at[0], p) for p in ps]))


def run_lasso(ns: list[int], ps: list[int], repeats: int, *, restarts: int = 3, max_iter: int = 300,
              progress: bool = True, at: tuple[int, int] = (800, 200)) -> list[dict]:
    """The rows of the Lasso experiment: the calibration samples (``sample`` = "calibration", at
    (n, p) = ``at``) and ``repeats`` measured samples of every setting (:func:`settings` around
    ``at``), each a row per constant."""
    from tqdm.auto import tqdm

    todo = [("calibration", *at, 900_000 + r) for r in range(CALIBRATION_SAMPLES)]
    todo += [("measured", n, p, 1_000_003 * n + 7919 * p + r) for n, p in settings(ns, ps, at)
             for r in range(repeats)]
    rows = []
    for sample, n, p, seed in tqdm(todo, disable=not progress, desc="rates lasso", unit="path"):
        rows += _path_rows(n, p, seed, restarts, max_iter, sample)
    return rows


def _best_constant(rows: list[dict]) -> float:
    return max(rows, key=lambda r: (r["f1"], -r["a_error"]))["c"]


def summarize_lasso(rows: list[dict]) -> tuple[float, list[dict]]:
    """``(c_star, per-setting rows)``: the calibrated constant and, per (n, p) of the measured
    samples, the mean ± sd of F1, gate F1 and a_error at ``c_star``, the geometric mean of
    ``best c / c_star`` and the share of samples whose best constant is within a factor 3 of it."""
    calib = [r for r in rows if r["sample"] == "calibration"]
    if not calib:
        raise ValueError("the rows hold no calibration samples")
    c_star = max(CONSTANTS, key=lambda c: statistics.fmean(r["f1"] for r in calib if r["c"] == c))
    measured = [r for r in rows if r["sample"] == "measured"]
    out = []
    for n, p in dict.fromkeys((r["n"], r["p"]) for r in measured):
        here = [r for r in measured if (r["n"], r["p"]) == (n, p)]
        at = [r for r in here if r["c"] == c_star]
        ratios = [_best_constant([r for r in here if r["seed"] == s]) / c_star for s in dict.fromkeys(r["seed"]
                                                                                                    for r in here)]
        row = {"n": n, "p": p, "samples": len(at), "c_star": c_star, "lam_star": at[0]["lam"]}
        for key in ("f1", "gate_f1", "a_error"):
            vals = [r[key] for r in at]
            row[f"{key}_mean"] = statistics.fmean(vals)
            row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else math.nan
        row["best_c_ratio_geomean"] = math.exp(statistics.fmean(math.log(v) for v in ratios))
        row["best_within_3x"] = sum(1 / 3 <= v <= 3 for v in ratios) / len(ratios)
        out.append(row)
    return c_star, out


def plot_lasso(rows: list[dict], summary: list[dict], slope: tuple[float, float, float], path, title: str,
               p_at: int = 200) -> None:
    """Three panels: mean F1 against c per setting, a_error at c_star against n (log-log, p =
    ``p_at``), and the mean F1 at c_star per setting."""
    from gatezoo.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    measured = [r for r in rows if r["sample"] == "measured"]
    c_star = summary[0]["c_star"]
    for n, p in dict.fromkeys((r["n"], r["p"]) for r in measured):
        means = [statistics.fmean(r["f1"] for r in measured if (r["n"], r["p"], r["c"]) == (n, p, c))
                 for c in CONSTANTS]
        axes[0].semilogx(CONSTANTS, means, "o-", ms=3, label=f"n={n}, p={p}")
    axes[0].axvline(c_star, color="k", ls=":", lw=1)
    axes[0].set_xticks(CONSTANTS, [f"{c:g}" for c in CONSTANTS], fontsize=7)
    axes[0].minorticks_off()
    axes[0].set(xlabel="c  (lam = c sqrt(log p / n))", ylabel="support F1 (experts)", ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    fixed_p = [s for s in summary if s["p"] == p_at]
    axes[1].loglog([s["n"] for s in fixed_p], [s["a_error_mean"] for s in fixed_p], "o-")
    axes[1].set(xlabel=f"n (p = {p_at})", ylabel="||a - a*|| at c*",
                title=f"slope {slope[0]:.3f} [{slope[1]:.3f}, {slope[2]:.3f}]")
    labels = [f"{s['n']}/{s['p']}" for s in summary]
    axes[2].bar(labels, [s["f1_mean"] for s in summary], yerr=[s["f1_sd"] for s in summary])
    axes[2].set(ylabel=f"F1 at c* = {c_star}", xlabel="n / p", ylim=(0, 1.05))
    axes[2].tick_params(axis="x", labelrotation=45, labelsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    save_figure(fig, path, title)
