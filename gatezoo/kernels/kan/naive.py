"""The readable oracle of one Kolmogorov-Arnold layer (Liu et al. 2024, "KAN").

Every edge (input i -> output o) carries a learnable univariate function; the layer sums them:

    y_o = sum_i  W_b[o, i] * base(x_i)  +  sum_i sum_j  C[o, i, j] * B_j(x_i)  (+ b_o)

with ``base`` one of :data:`BASE_ACTIVATIONS` (or no base branch) and ``B_j`` one of two bases
over ``grid_range = (lo, hi)`` cut into ``G`` equal cells of width ``h = (hi - lo) / G``:

* ``"bspline"``: B-splines of degree ``p`` on the grid extended by ``p`` cells on each side,
  knots ``t_m = lo + (m - p) h`` for ``m = 0 .. G + 2p``, by the Cox-de Boor recursion
  (:func:`bspline_basis`): ``G + p`` functions that sum to 1 on ``[lo, hi)`` and vanish outside
  ``[t_0, t_{G+2p})``.
* ``"rbf"``: Gaussian bumps ``exp(-((x - c_j) / h)^2)`` on the ``G + 1`` grid points
  ``c_j = lo + j h`` (:func:`rbf_basis`).

:func:`kan_linear_composed` is the plain composition: it materialises the (..., in, basis)
tensor and lets autograd keep every intermediate. It is the float64 oracle of the tests, the
eager peer in the benchmarks, what ``torch.compile`` traces and what the second-order gradients
differentiate (see docs/architecture.md, 'The math'). Special values: a basis function is 0 at
+-inf (outside its support) and NaN at NaN, so a NaN input gives NaN outputs even without a base
branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BASES = ("bspline", "rbf")
BASE_ACTIVATIONS = ("silu", "elu", "relu")


def knots(grid_range, grid_size: int, spline_order: int, basis: str) -> torch.Tensor:
    """The B-spline knots ``t_m`` (``"bspline"``) or the RBF centres ``c_j`` (``"rbf"``), float64."""
    lo, hi = (float(v) for v in grid_range)
    h = (hi - lo) / grid_size
    if basis == "bspline":
        steps = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float64)
    else:
        steps = torch.arange(0, grid_size + 1, dtype=torch.float64)
    return lo + steps * h


def num_basis(grid_size: int, spline_order: int, basis: str) -> int:
    """How many basis functions a layer has: ``G + p`` B-splines or ``G + 1`` bumps."""
    return grid_size + spline_order if basis == "bspline" else grid_size + 1


def bspline_basis(x: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """The B-spline basis of degree ``order`` on ``knots`` (K,) evaluated at ``x`` (...,):
    shape (..., K - 1 - order), by the Cox-de Boor recursion (differentiable in ``x``)."""
    x = x.unsqueeze(-1)
    t = knots.to(x.dtype)
    basis = ((x >= t[:-1]) & (x < t[1:])).to(x.dtype)  # degree 0, one per cell
    # +-inf lies in no cell; keep it out of the products, where inf * 0 would give NaN
    x = torch.where(torch.isinf(x), torch.zeros_like(x), x)
    for q in range(1, order + 1):
        left = (x - t[: -(q + 1)]) / (t[q:-1] - t[: -(q + 1)])
        right = (t[q + 1:] - x) / (t[q + 1:] - t[1:-q])
        basis = left * basis[..., :-1] + right * basis[..., 1:]
    return torch.where(torch.isnan(x), x, basis)


def rbf_basis(x: torch.Tensor, centres: torch.Tensor, cell: float) -> torch.Tensor:
    """Gaussian bumps ``exp(-((x - c_j) / cell)^2)``: (...,) -> (..., len(centres)); 0 at +-inf."""
    x = x.unsqueeze(-1)
    inf = torch.isinf(x)
    finite = torch.where(inf, torch.zeros_like(x), x)  # no inf * 0 in the gradient at +-inf
    bumps = torch.exp(-((finite - centres.to(x.dtype)) / cell).square())
    return torch.where(inf, torch.zeros_like(bumps), bumps)


def base_activation(name: str | None, x: torch.Tensor) -> torch.Tensor:
    """The base branch's activation by name. SiLU takes gatezoo's values at +-inf (+inf and -0,
    slopes 1 and 0; docs/activation.md) rather than PyTorch's NaN."""
    if name == "silu":
        inf = torch.isinf(x)
        y = F.silu(torch.where(inf, torch.zeros_like(x), x))
        return torch.where(inf, torch.where(x > 0, x, torch.full_like(x, -0.0)), y)
    if name == "elu":
        return F.elu(x)
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"base_activation must be one of {BASE_ACTIVATIONS} or None, got {name!r}")


def basis_values(x: torch.Tensor, basis: str, grid_range, grid_size: int, spline_order: int) -> torch.Tensor:
    """The basis functions at every input: (...,) -> (..., num_basis)."""
    t = knots(grid_range, grid_size, spline_order, basis)
    if basis == "bspline":
        return bspline_basis(x, t, spline_order)
    lo, hi = (float(v) for v in grid_range)
    return rbf_basis(x, t, (hi - lo) / grid_size)


def kan_linear_composed(x, spline_weight, base_weight=None, bias=None, basis: str = "bspline",
                        grid_range=(-2.0, 2.0), grid_size: int = 5, spline_order: int = 3,
                        base_act: str | None = "silu"):
    """One KAN layer as a plain composition: ``x`` (..., in), ``spline_weight`` (out, in, basis),
    ``base_weight`` (out, in) or None, ``bias`` (out,) or None -> (..., out)."""
    b = basis_values(x, basis, grid_range, grid_size, spline_order)
    y = F.linear(b.flatten(-2), spline_weight.flatten(1), bias)
    if base_weight is not None:
        y = y + F.linear(base_activation(base_act, x), base_weight)
    return y
