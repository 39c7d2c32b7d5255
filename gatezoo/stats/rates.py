"""Convergence-rate experiments: fit a mixture of experts on samples of growing size and measure
how fast its error falls.

    python -m gatezoo.stats.rates --experiment exact                 # exact-fitted softmax Gaussian MoE
    python -m gatezoo.stats.rates --experiment overfit --repeats 20  # one expert too many
    python -m gatezoo.stats.rates --experiment exact --n_min 100 --n_max 10000 --sizes 5 --out my.csv

For each sample size n on a log grid from ``n_min`` to ``n_max`` (``sizes`` points) and each of
``repeats`` seeded samples, the experiment draws (x, y) from the true model, fits it by EM with
``restarts`` restarts and records the errors:

- ``voronoi``: the Voronoi loss of the fitted mixing measure (:func:`~gatezoo.stats.voronoi_loss`);
- ``hellinger``: the Hellinger distance of the fitted and true conditional densities;
- for the over-fitted experiment, ``overfit_atoms``: the largest distance of a fitted atom in a
  cell of two to its true atom (the slow parameter rate shows there).

Each error's log-log slope against n is fitted by least squares on the per-n means of its
logarithm. Its 95% interval comes from 2,000 bootstrap resamples of the repeats within each n.
Every row goes to the CSV (``--out``, default ``benchmarks/gating-rates-<experiment>.csv``),
with the slopes in a second CSV beside it (``-slopes.csv``) and a log-log plot (``.png``).

The experiments (:data:`EXPERIMENTS`):

- ``exact``: 2 experts fitted with 2. The truth is the two-expert setting in the comments of the
  authors' code (CRPE-SGaME, ``discrepancies.py``), on x uniform on [0, 1]. Nguyen, Nguyen and
  Ho 2023 prove the Voronoi loss and the density converge at n^(-1/2) up to a log factor.
- ``overfit``: the same truth fitted with 3 experts. The density still converges at n^(-1/2);
  the parameters of the cell that receives two atoms converge at n^(-1/8) (gate slope,
  intercept) and n^(-1/4) (expert slope, variance).
- ``topk1_overfit`` and ``topk2_overfit``: the same truth with a top-1 gate, fitted with 3
  experts and a top-1 or a top-2 gate. Nguyen et al. 2024 (ICLR, top-K sparse softmax gating)
  prove that an over-specified fit converges only when its K exceeds the number of fitted atoms
  a true atom's cell needs: with K = 1 the density error should stop falling, with K = 2 it
  should converge (``hellinger``). The EM gate step fits the full softmax (see
  :func:`~gatezoo.stats.moe.fit_em`).
- ``logistic_softmax`` and ``logistic_modified``: two multinomial logistic experts over two
  classes, one with a vanishing slope (eta = 0), x uniform on [-1, 1], fitted with 2 experts.
  The truth is gatezoo's own; the authors' simulation settings are not public. Nguyen et al.
  2024 prove parameter rates slower than any polynomial under the softmax gate, and polynomial
  rates under the modified gate (``class_tv``: the class distributions' total variation).
- ``lasso``: the l1-penalised EM in high dimension over p and lam, with its own rows, summary
  (``-summary.csv``) and plot: see :mod:`gatezoo.stats.lasso_rates` (defaults: n from 200 to
  3200 at p = 200, p in 50, 200, 800 at n = 800).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .distance import class_total_variation, hellinger
from .logistic import LogisticMoE, fit_em_logistic
from .moe import GaussianMoE, fit_em
from .voronoi import atom_distances, voronoi_loss

__all__ = ["EXPERIMENTS", "Experiment", "fit_slope", "run_experiment"]


def _crpe_truth() -> GaussianMoE:
    """Two experts on one input: gate (beta0, beta1) = (-7, 15) and (0, 0); experts (b, a) = (2, -15)
    and (2, 1); variances 0.3^2 and 0.4^2."""
    return GaussianMoE(beta1=[[15.0], [0.0]], beta0=[-7.0, 0.0], a=[[-15.0], [1.0]], b=[2.0, 2.0], var=[0.09, 0.16])


def _vanishing_truth(gate: str) -> LogisticMoE:
    """Two logistic experts over 2 classes on one input; expert 0's slope vanishes (eta = 0)."""
    return LogisticMoE(beta1=[[2.0], [0.0]], beta0=[0.5, 0.0], eta=[[[0.0], [0.0]], [[-3.0], [0.0]]],
                       tau=[[1.0, 0.0], [-0.5, 0.0]], gate=gate)


@dataclass(frozen=True)
class Experiment:
    """A rate experiment: the true model, the number of fitted experts, the input box, its errors
    and its estimator (``fit(x, y, k, restarts, max_iter, seed)``)."""

    truth: Callable[[], GaussianMoE | LogisticMoE]
    fitted_k: int
    x_low: float
    x_high: float
    errors: tuple[str, ...]
    description: str
    fit: Callable = None


def _fit_gaussian(x, y, k, restarts, max_iter, seed):
    return fit_em(x, y, k, restarts=restarts, max_iter=max_iter, seed=seed)


def _fit_topk(top_k):
    def fit(x, y, k, restarts, max_iter, seed):
        # EM started from random responsibilities under a hard top-K gate stalls at once (the
        # responsibilities follow the starting gate); start it from the softmax-gated fit instead
        soft = fit_em(x, y, k, restarts=restarts, max_iter=max_iter, seed=seed)
        return fit_em(x, y, k, gate="topk", top_k=top_k, restarts=1, max_iter=max_iter, seed=seed,
                      init=replace(soft.model, gate="topk", top_k=top_k))
    return fit


def _crpe_top1() -> GaussianMoE:
    """The two-expert truth of :func:`_crpe_truth` with a top-1 gate (each x goes to one expert)."""
    return replace(_crpe_truth(), gate="topk", top_k=1)


def _fit_logistic(gate):
    def fit(x, y, k, restarts, max_iter, seed):
        return fit_em_logistic(x, y, k, 2, gate=gate, restarts=restarts, max_iter=max_iter, seed=seed)
    return fit


EXPERIMENTS = {
    "exact": Experiment(_crpe_truth, 2, 0.0, 1.0, ("voronoi", "hellinger"),
                        "2 true experts fitted with 2 (exact-fitted, softmax gate)", _fit_gaussian),
    "overfit": Experiment(_crpe_truth, 3, 0.0, 1.0, ("voronoi", "hellinger", "overfit_atoms"),
                          "2 true experts fitted with 3 (over-fitted by one, softmax gate)", _fit_gaussian),
    "topk1_overfit": Experiment(_crpe_top1, 3, 0.0, 1.0, ("hellinger",),
                                "2 true experts with a top-1 gate, fitted with 3 experts and a top-1 gate",
                                _fit_topk(1)),
    "topk2_overfit": Experiment(_crpe_top1, 3, 0.0, 1.0, ("hellinger",),
                                "2 true experts with a top-1 gate, fitted with 3 experts and a top-2 gate",
                                _fit_topk(2)),
    "logistic_softmax": Experiment(lambda: _vanishing_truth("softmax"), 2, -1.0, 1.0, ("voronoi", "class_tv"),
                                   "2 logistic experts, one with a vanishing slope, softmax gate",
                                   _fit_logistic("softmax")),
    "logistic_modified": Experiment(lambda: _vanishing_truth("modified"), 2, -1.0, 1.0, ("voronoi", "class_tv"),
                                    "the same with the modified gate softmax(beta1 tanh(x) + beta0)",
                                    _fit_logistic("modified")),
}
"""The rate experiments by name."""


def _overfit_atoms(fitted: GaussianMoE, truth: GaussianMoE) -> float:
    """The largest parameter distance of a fitted atom that shares its Voronoi cell (0 when none does)."""
    total = atom_distances(fitted, truth)
    cells = total.argmin(dim=1)
    sizes = torch.bincount(cells, minlength=truth.k)
    shared = [float(total[i, j]) for i, j in enumerate(cells.tolist()) if sizes[j] > 1]
    return max(shared, default=0.0)


def fit_slope(ns: list[int], values: list[list[float]], boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(slope, low, high)``: the least-squares slope of mean log(value) on log n, and its 95%
    bootstrap interval (repeats resampled within each n). Non-positive values are refused."""
    if any(v <= 0 or not math.isfinite(v) for row in values for v in row):
        raise ValueError("the errors must be finite and > 0 to fit a log-log slope")
    logn = torch.tensor([math.log(n) for n in ns], dtype=torch.float64)
    logs = [torch.tensor([math.log(v) for v in row], dtype=torch.float64) for row in values]

    def slope(means: torch.Tensor) -> float:
        xc = logn - logn.mean()
        return float((xc * (means - means.mean())).sum() / (xc ** 2).sum())

    point = slope(torch.stack([row.mean() for row in logs]))
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(boot):
        means = torch.stack([row[torch.randint(0, len(row), (len(row),), generator=g)].mean() for row in logs])
        draws.append(slope(means))
    draws.sort()
    return point, draws[int(0.025 * boot)], draws[int(0.975 * boot) - 1]


def log_grid(n_min: int, n_max: int, sizes: int) -> list[int]:
    """``sizes`` integers spaced evenly in log from ``n_min`` to ``n_max`` (duplicates dropped)."""
    return sorted({round(math.exp(math.log(n_min) + i * (math.log(n_max) - math.log(n_min)) / (sizes - 1)))
                   for i in range(sizes)})


def run_experiment(name: str, *, n_min: int = 100, n_max: int = 100_000, sizes: int = 7, repeats: int = 20,
                   restarts: int = 3, max_iter: int = 500, seed: int = 0, progress: bool = True) -> list[dict]:
    """The rows (one per sample size and repeat) of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    for key, value, minimum in (("n_min", n_min, 1), ("n_max", n_max, n_min), ("sizes", sizes, 2),
                                ("repeats", repeats, 2), ("restarts", restarts, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be an int >= {minimum}, got {value!r}")
    exp = EXPERIMENTS[name]
    truth = exp.truth()
    ns = log_grid(n_min, n_max, sizes)
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(ns) * repeats, disable=not progress, desc=f"rates {name}", unit="fit")
    for n in ns:
        for r in range(repeats):
            x, y = truth.sample(n, seed=1_000_003 * n + r, x_low=exp.x_low, x_high=exp.x_high)
            fit = exp.fit(x, y, exp.fitted_k, restarts, max_iter, r)
            row = {"experiment": name, "n": n, "repeat": r, "log_likelihood": fit.log_likelihood,
                   "iterations": fit.iterations, "converged": fit.converged}
            if "voronoi" in exp.errors:
                row["voronoi"] = voronoi_loss(fit.model, truth)
            box = dict(seed=r, x_low=exp.x_low, x_high=exp.x_high)
            if "hellinger" in exp.errors:
                row["hellinger"] = hellinger(fit.model, truth, **box)
            if "class_tv" in exp.errors:
                row["class_tv"] = class_total_variation(fit.model, truth, **box)
            if "overfit_atoms" in exp.errors:
                row["overfit_atoms"] = _overfit_atoms(fit.model, truth)
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def slopes(rows: list[dict], errors: tuple[str, ...]) -> list[dict]:
    """Per error, the fitted slope and its interval over the rows (rows with an error of 0 are
    left out of that error's fit, and counted)."""
    out = []
    ns = sorted({r["n"] for r in rows})
    for err in errors:
        values = [[r[err] for r in rows if r["n"] == n and r[err] > 0] for n in ns]
        kept = [(n, v) for n, v in zip(ns, values) if len(v) >= 2]
        dropped = sum(1 for r in rows if r[err] <= 0)
        if len(kept) < 2:
            out.append({"error": err, "slope": math.nan, "low": math.nan, "high": math.nan, "zero_rows": dropped})
            continue
        s, lo, hi = fit_slope([n for n, _ in kept], [v for _, v in kept])
        out.append({"error": err, "slope": s, "low": lo, "high": hi, "zero_rows": dropped})
    return out


def plot(rows: list[dict], fitted: list[dict], path: Path, title: str) -> None:
    """Log-log panels, one per error: every repeat as a dot, the per-n geometric mean as a line."""
    from gatezoo.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(fitted), figsize=(4.4 * len(fitted), 3.8), squeeze=False)
    ns = sorted({r["n"] for r in rows})
    for ax, f in zip(axes[0], fitted):
        err = f["error"]
        pts = [(r["n"], r[err]) for r in rows if r[err] > 0]
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], ".", alpha=0.3, ms=4)
        means = [math.exp(statistics.fmean(math.log(r[err]) for r in rows if r["n"] == n and r[err] > 0))
                 for n in ns if any(r["n"] == n and r[err] > 0 for r in rows)]
        ax.loglog([n for n in ns if any(r["n"] == n and r[err] > 0 for r in rows)], means, "o-")
        ax.set_title(f"{err}: slope {f['slope']:.3f} [{f['low']:.3f}, {f['high']:.3f}]", fontsize=9)
        ax.set_xlabel("n")
        ax.grid(alpha=0.3, which="both")
    save_figure(fig, path, title)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m gatezoo.stats.rates", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--experiment", required=True, choices=sorted([*EXPERIMENTS, "lasso"]))
    p.add_argument("--n_min", type=int, default=None, help="[100; lasso: 200]")
    p.add_argument("--n_max", type=int, default=None, help="[100000; lasso: 3200]")
    p.add_argument("--sizes", type=int, default=None, help="sample sizes on the log grid [7; lasso: 5]")
    p.add_argument("--p_list", type=lambda v: [int(t) for t in v.split(",")], default=[50, 200, 800],
                   help="lasso: input dimensions tried at the n of --at [50,200,800]")
    p.add_argument("--at", type=lambda v: tuple(int(t) for t in v.split(",")), default=(800, 200),
                   help="lasso: n,p of the calibration samples, the p of the n sweep and the n of the p sweep "
                        "[800,200]")
    p.add_argument("--repeats", type=int, default=20, help="seeded samples per size [20]")
    p.add_argument("--restarts", type=int, default=3, help="EM restarts per fit [3]")
    p.add_argument("--max_iter", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--progress", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--out", help="CSV path [benchmarks/gating-rates-<experiment>.csv]")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a bad argument)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lasso = args.experiment == "lasso"
    n_min = (200 if lasso else 100) if args.n_min is None else args.n_min
    n_max = (3200 if lasso else 100_000) if args.n_max is None else args.n_max
    sizes = (5 if lasso else 7) if args.sizes is None else args.sizes
    out = Path(args.out or f"benchmarks/gating-rates-{args.experiment}.csv")
    try:
        if lasso:
            return _main_lasso(args, n_min, n_max, sizes, out)
        rows = run_experiment(args.experiment, n_min=n_min, n_max=n_max, sizes=sizes,
                              repeats=args.repeats, restarts=args.restarts, max_iter=args.max_iter,
                              progress=args.progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exp = EXPERIMENTS[args.experiment]
    fitted = slopes(rows, exp.errors)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(rows, out)
    _write(fitted, out.with_name(out.stem + "-slopes.csv"))
    plot(rows, fitted, out.with_suffix(".png"), f"{args.experiment}: {exp.description}")
    print(f"{args.experiment}: {exp.description}; n from {n_min} to {n_max}, {args.repeats} repeats")
    for f in fitted:
        print(f"  {f['error']:<14} slope {f['slope']:+.3f}  95% [{f['low']:+.3f}, {f['high']:+.3f}]")
    print(f"wrote {out}, its -slopes.csv and .png")
    return 0


def _main_lasso(args, n_min: int, n_max: int, sizes: int, out: Path) -> int:
    from .lasso_rates import plot_lasso, run_lasso, summarize_lasso

    for key, value, minimum in (("n_min", n_min, 1), ("n_max", n_max, n_min), ("sizes", sizes, 2),
                                ("repeats", args.repeats, 2)):
        if value < minimum:
            raise ValueError(f"{key} must be >= {minimum}, got {value}")
    ns = log_grid(n_min, n_max, sizes)
    if len(args.at) != 2 or min(args.at) < 2:
        raise ValueError(f"--at must be n,p with both >= 2, got {args.at}")
    n_at, p_at = args.at
    rows = run_lasso(ns, args.p_list, args.repeats, restarts=args.restarts, max_iter=args.max_iter,
                     progress=args.progress, at=(n_at, p_at))
    c_star, summary = summarize_lasso(rows)
    fixed_p = [s for s in summary if s["p"] == p_at]
    errors = [[r["a_error"] for r in rows if r["sample"] == "measured" and (r["n"], r["p"], r["c"]) == (s["n"], p_at,
                                                                                                    c_star)]
              for s in fixed_p]
    slope = fit_slope([s["n"] for s in fixed_p], errors)
    for s in summary:
        s["a_error_slope_vs_n"] = slope[0] if s["p"] == p_at else math.nan
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(rows, out)
    _write(summary, out.with_name(out.stem + "-summary.csv"))
    plot_lasso(rows, summary, slope, out.with_suffix(".png"),
               f"lasso: l1-penalised EM, lam = c sqrt(log p / n), c* = {c_star} (calibrated)", p_at=p_at)
    calibration = len({r["seed"] for r in rows if r["sample"] == "calibration"})
    print(f"lasso: c* = {c_star} (best mean F1 on {calibration} calibration "
          f"samples at n = {n_at}, p = {p_at}); {args.repeats} measured samples per setting")
    for s in summary:
        print(f"  n={s['n']:>5} p={s['p']:>4}  F1 {s['f1_mean']:.3f} ± {s['f1_sd']:.3f}  gate F1 "
              f"{s['gate_f1_mean']:.3f}  ||a-a*|| {s['a_error_mean']:.3f}  best c / c* "
              f"{s['best_c_ratio_geomean']:.2f} (within 3x: {s['best_within_3x']:.0%})")
    print(f"  ||a - a*|| at c* against n (p = {p_at}): slope {slope[0]:+.3f} 95% [{slope[1]:+.3f}, {slope[2]:+.3f}]")
    print(f"wrote {out}, its -summary.csv and .png")
    return 0


def _write(rows: list[dict], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    sys.exit(main())
