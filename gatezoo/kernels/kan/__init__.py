"""One Kolmogorov-Arnold layer as a fused op: :func:`kan_linear`.

Files (the layout every op copies, see docs/architecture.md, 'Layers and layout'):

* ``naive.py`` - :func:`kan_linear_composed`, the oracle (Cox-de Boor on every knot, autograd
  keeps every level).
* ``torch_path.py`` - :class:`~.torch_path.KANLinearFunction`: the per-cell polynomial form of
  the basis, evaluated block by block in cache and recomputed in backward; saves only its input.
* ``triton.py`` - fused Triton kernels that compute the basis inside the contraction (the
  (N, in, basis) tensor never reaches memory), forward and backward.
* ``__init__.py`` - validation and :func:`~gatezoo.kernels.backend.dispatch` (this file).
"""

from __future__ import annotations

import math
import numbers

import torch

from ..backend import dispatch, float64_unsupported, in_compute_dtype
from .naive import (
    BASE_ACTIVATIONS,
    BASES,
    basis_values,
    bspline_basis,
    kan_linear_composed,
    knots,
    num_basis,
    rbf_basis,
)
from .torch_path import KANLinearFunction, KANSpec

__all__ = ["BASES", "BASE_ACTIVATIONS", "KANSpec", "basis_values", "bspline_basis", "kan_linear",
           "kan_linear_composed", "knots", "num_basis", "rbf_basis"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def make_spec(basis: str, grid_range, grid_size: int, spline_order: int, base_activation) -> KANSpec:
    """Check the layer's options and return them as a :class:`KANSpec` (errors name the argument)."""
    if not isinstance(basis, str) or basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    grid_size = _int("grid_size", grid_size, 1)
    spline_order = _int("spline_order", spline_order, 0)
    try:
        lo, hi = (float(v) for v in grid_range)
    except (TypeError, ValueError):
        raise ValueError(f"grid_range must be a pair (lo, hi) of numbers, got {grid_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"grid_range must be finite with lo < hi, got {grid_range!r}")
    if base_activation is not None and base_activation not in BASE_ACTIVATIONS:
        raise ValueError(f"base_activation must be one of {BASE_ACTIVATIONS} or None, got {base_activation!r}")
    return KANSpec(basis, lo, hi, grid_size, spline_order, base_activation)


def _check(x, spline_weight, base_weight, bias, spec: KANSpec):
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the input features)")
    n_in, nb = x.shape[-1], spec.num_basis
    named = [("spline_weight", spline_weight), ("base_weight", base_weight), ("bias", bias)]
    for name, w in named:
        if w is None:
            continue
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
        if w.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {w.device}")
    if spline_weight is None or spline_weight.dim() != 3 or tuple(spline_weight.shape[1:]) != (n_in, nb):
        got = None if spline_weight is None else tuple(spline_weight.shape)
        raise ValueError(f"spline_weight must have shape (out_features, {n_in}, {nb}) for {n_in} input features "
                         f"and {nb} basis functions, got {got}")
    n_out = spline_weight.shape[0]
    if (base_weight is None) != (spec.base_act is None):
        raise ValueError(f"base_weight must be given exactly when base_activation is set; got base_activation="
                         f"{spec.base_act!r} and base_weight {'None' if base_weight is None else 'a tensor'}")
    if base_weight is not None and tuple(base_weight.shape) != (n_out, n_in):
        raise ValueError(f"base_weight must have shape ({n_out}, {n_in}), got {tuple(base_weight.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")


def kan_linear(x: torch.Tensor, spline_weight: torch.Tensor, base_weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, basis: str = "bspline", grid_range=(-2.0, 2.0),
               grid_size: int = 5, spline_order: int = 3, base_activation: str | None = "silu",
               backend: str = "auto") -> torch.Tensor:
    """One KAN layer, ``y = base(x) @ W_b^T + B(x) @ C^T + b`` (the math is in :mod:`.naive`).

    Args:
        x: (..., in) input, any floating dtype (computed in float32, float64 for float64).
        spline_weight: ``C`` (out, in, basis) with ``basis = grid_size + spline_order`` for B-splines
            and ``grid_size + 1`` for RBF bumps.
        base_weight: ``W_b`` (out, in); required when ``base_activation`` is set, else None.
        bias: (out,) or None.
        basis: ``"bspline"`` or ``"rbf"``.
        grid_range: ``(lo, hi)``, finite, ``lo < hi``.
        grid_size: cells G over ``grid_range``.
        spline_order: B-spline degree p (unused by ``"rbf"``).
        base_activation: ``"silu"`` (default), ``"elu"``, ``"relu"`` or None (no base branch).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`gatezoo.kernels.backend`).

    Returns (..., out) in x's dtype. Only the inputs are saved for backward, whatever the backend.
    """
    spec = make_spec(basis, grid_range, grid_size, spline_order, base_activation)
    _check(x, spline_weight, base_weight, bias, spec)

    def naive():
        cast = [None if t is None else in_compute_dtype(t) for t in (x, spline_weight, base_weight, bias)]
        return kan_linear_composed(*cast, **spec.composed_args()).to(x.dtype)

    def triton_path():
        from .triton import KANLinearTriton

        return KANLinearTriton.apply(x, spline_weight, base_weight, bias, spec)

    return dispatch(
        backend, x,
        naive=naive,
        torch_path=lambda: KANLinearFunction.apply(x, spline_weight, base_weight, bias, spec),
        triton_path=triton_path,
        triton_unsupported=lambda: float64_unsupported(x, spline_weight, base_weight, bias),
        empty=x.numel() == 0 or spline_weight.shape[0] == 0,
    )
