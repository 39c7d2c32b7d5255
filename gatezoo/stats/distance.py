"""Distances between the conditional densities of two Gaussian mixtures of experts.

``hellinger(p, q)`` is the Hellinger distance of the joint densities ``p(x) p(y | x)`` and
``p(x) q(y | x)`` for inputs uniform on a box: ``H^2 = E_x [1 - int sqrt(p(y|x) q(y|x)) dy]``.
The expectation over x is a Monte Carlo mean over ``n_x`` seeded draws; the integral over y is a
trapezoid rule on a grid that spans every expert's mean ± 10 standard deviations at that x, so
its error is far below the Monte Carlo error. ``total_variation`` does the same for
``(1/2) int |p - q| dy``, on a finer grid by default: its integrand has kinks where the two
densities cross, where the trapezoid rule is only second-order accurate. For classification
mixtures, ``class_total_variation`` sums over the classes exactly.
"""

from __future__ import annotations

import math

import torch

from .moe import GaussianMoE

__all__ = ["class_total_variation", "hellinger", "total_variation"]


def _grid_densities(p: GaussianMoE, q: GaussianMoE, n_x: int, grid: int, seed: int, x_low: float, x_high: float):
    if p.d != q.d:
        raise ValueError(f"the models have different input dimensions: {p.d} and {q.d}")
    g = torch.Generator().manual_seed(seed)
    x = x_low + (x_high - x_low) * torch.rand(n_x, p.d, generator=g, dtype=torch.float64)
    means = torch.cat([x @ p.a.T + p.b, x @ q.a.T + q.b], dim=1)  # (n_x, K_p + K_q)
    sds = torch.cat([p.var, q.var]).sqrt()
    lo = (means - 10 * sds).min(dim=1).values
    hi = (means + 10 * sds).max(dim=1).values
    t = torch.linspace(0, 1, grid, dtype=torch.float64)
    ys = lo[:, None] + (hi - lo)[:, None] * t[None, :]  # (n_x, grid)
    xr = x.repeat_interleave(grid, dim=0)
    dp = p.log_density(xr, ys.reshape(-1)).reshape(n_x, grid).exp()
    dq = q.log_density(xr, ys.reshape(-1)).reshape(n_x, grid).exp()
    return ys, dp, dq


def hellinger(p: GaussianMoE, q: GaussianMoE, *, n_x: int = 500, grid: int = 1001, seed: int = 0,
              x_low: float = -1.0, x_high: float = 1.0) -> float:
    """The Hellinger distance (in [0, 1]) of the two conditional densities, averaged over x."""
    ys, dp, dq = _grid_densities(p, q, n_x, grid, seed, x_low, x_high)
    affinity = torch.trapezoid((dp * dq).sqrt(), ys, dim=1)
    return math.sqrt(max(float((1 - affinity).mean()), 0.0))


def total_variation(p: GaussianMoE, q: GaussianMoE, *, n_x: int = 500, grid: int = 4001, seed: int = 0,
                    x_low: float = -1.0, x_high: float = 1.0) -> float:
    """The total-variation distance (in [0, 1]) of the two conditional densities, averaged over x."""
    ys, dp, dq = _grid_densities(p, q, n_x, grid, seed, x_low, x_high)
    return float(0.5 * torch.trapezoid((dp - dq).abs(), ys, dim=1).mean())


def class_total_variation(p, q, *, n_x: int = 2000, seed: int = 0, x_low: float = -1.0, x_high: float = 1.0) -> float:
    """For two :class:`~gatezoo.stats.logistic.LogisticMoE`: ``E_x (1/2) sum_c |p(c | x) - q(c | x)|``,
    a Monte Carlo mean over seeded uniform inputs (the class sum is exact)."""
    if p.d != q.d or p.classes != q.classes:
        raise ValueError(f"the models differ in inputs or classes: ({p.d}, {p.classes}) and ({q.d}, {q.classes})")
    g = torch.Generator().manual_seed(seed)
    x = x_low + (x_high - x_low) * torch.rand(n_x, p.d, generator=g, dtype=torch.float64)
    diff = 0
    for c in range(p.classes):
        y = torch.full((n_x,), c)
        diff = diff + (p.log_density(x, y).exp() - q.log_density(x, y).exp()).abs()
    return float(0.5 * diff.mean())
