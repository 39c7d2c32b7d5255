"""Gated activations and GLUs with expanded gates (Huang 2024; Shazeer 2020).

``phi(a)`` is one row of :data:`KINDS` (see :mod:`.kinds`): ``expand(g(a), alpha)`` for
order-1 gates and ``a * expand(g(a), alpha)`` for order-2 gates, where
``expand(g, alpha) = (1 + 2 alpha) g - alpha`` and ``alpha = 0`` when not given.

* :func:`gated_act` - ``phi(x)`` (SiLU, GELU, ATLU and their expanded forms ...)
* :func:`glu` - ``phi(a) * b`` (GLU, Bilinear, ReGLU, GEGLU, SwiGLU, xSwiGLU ...)
* :func:`glu_packed` - ``phi(x[..., :h]) * x[..., h:]``, reading both halves in place

All three are differentiable in every tensor argument, ``alpha`` included, and save only
their inputs for backward.
"""

from __future__ import annotations

import numbers

import torch

from ..backend import resolve_backend
from .kinds import IDENTITY, KINDS, ActKind, get_kind
from .reference import GatedActFunction, phi_composed, unpack

__all__ = ["KINDS", "ActKind", "gated_act", "glu", "glu_packed", "phi_composed"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_alpha(alpha, spec: ActKind, like: torch.Tensor):
    """alpha as a 0-dim tensor on ``like``'s device, or None."""
    if alpha is None:
        return None
    if not spec.takes_alpha:
        raise ValueError(f"alpha is not defined for kind={spec.name!r} (it has no gate to expand); pass alpha=None")
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a scalar (a 0-dim or 1-element tensor), got shape {tuple(alpha.shape)}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating-point tensor, got {alpha.dtype}")
        return alpha.reshape(()).to(like.device)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float or a 0-dim tensor, got {type(alpha).__name__}")
    return torch.tensor(float(alpha), dtype=torch.float32, device=like.device)


def _as_rows(t: torch.Tensor, unit_cols: bool) -> torch.Tensor:
    """A 2-D (rows, last dim) view of ``t``, copying only when the leading dims cannot merge
    (or, for Triton, when the last dim is not contiguous)."""
    n = t.shape[-1] if t.dim() else 1
    try:
        rows = t.view(-1, n)
    except RuntimeError:
        rows = t.reshape(-1, n)
    if unit_cols and n > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def _pick_backend(backend: str, t: torch.Tensor) -> str:
    chosen = resolve_backend(backend, t)
    if chosen == "triton" and t.dtype not in _TRITON_DTYPES:
        if backend == "triton":
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got {t.dtype}")
        return "torch"
    return chosen


def _apply(a2, b2, alpha, spec, packed, backend):
    if torch.compiler.is_compiling():
        # under torch.compile the composition is traced instead, so the compiler fuses it
        a2, b2 = unpack(a2, b2, packed)
        y = phi_composed(a2, spec, alpha)
        return y if b2 is None else y * b2
    if backend == "triton":
        from .triton import GatedActTriton

        return GatedActTriton.apply(a2, b2, alpha, spec, packed)
    return GatedActFunction.apply(a2, b2, alpha, spec, packed)


def gated_act(x: torch.Tensor, kind: str, alpha=None, *, backend: str = "auto") -> torch.Tensor:
    """phi(x) elementwise, e.g. ``gated_act(x, "silu")`` is SiLU and ``gated_act(x, "silu",
    alpha)`` is xSiLU.

    Args:
        x: floating-point tensor of any shape (views and non-contiguous tensors are fine).
        kind: a name in :data:`KINDS`.
        alpha: expansion scalar (float or 0-dim tensor, differentiable), or None for 0.
            Not allowed for ``identity`` and ``relu``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`gatezoo.kernels.backend`).

    ``kind="identity"`` computes nothing and returns a view of ``x``, like ``nn.Identity``.
    """
    spec = get_kind(kind)
    _check_tensor("x", x)
    be = _pick_backend(backend, x)
    alpha_t = _check_alpha(alpha, spec, x)
    if x.numel() == 0 or spec.gate == IDENTITY:  # nothing to compute: a view, as nn.Identity
        return phi_composed(x, spec, alpha_t).view_as(x)
    y = _apply(_as_rows(x, be == "triton"), None, alpha_t, spec, False, be)
    return y.view(x.shape)


def glu(a: torch.Tensor, b: torch.Tensor, kind: str, alpha=None, *, backend: str = "auto") -> torch.Tensor:
    """phi(a) * b: ``glu(a, b, "silu")`` is SwiGLU, ``glu(a, b, "sigmoid")`` the original GLU.

    Args:
        a: gate pre-activation (x W), floating point, any shape.
        b: value (x V), same shape, dtype and device as ``a``.
        kind, alpha, backend: as in :func:`gated_act`.
    """
    spec = get_kind(kind)
    _check_tensor("a", a)
    _check_tensor("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got a {a.dtype} and b {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got a on {a.device} and b on {b.device}")
    be = _pick_backend(backend, a)
    alpha_t = _check_alpha(alpha, spec, a)
    if a.numel() == 0:
        return phi_composed(a, spec, alpha_t) * b
    y = _apply(_as_rows(a, be == "triton"), _as_rows(b, be == "triton"), alpha_t, spec, False, be)
    return y.view(a.shape)


def glu_packed(x: torch.Tensor, kind: str, alpha=None, *, backend: str = "auto") -> torch.Tensor:
    """phi(x[..., :h]) * x[..., h:] with h = x.shape[-1] // 2, the layout of one fused input
    projection. Both halves are read in place through the row stride (no copy).

    Args:
        x: floating-point tensor whose last dim is even, shape (..., 2h). Returns (..., h).
        kind, alpha, backend: as in :func:`gated_act`.
    """
    spec = get_kind(kind)
    _check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension (the [a | b] halves), got shape {tuple(x.shape)}")
    be = _pick_backend(backend, x)
    alpha_t = _check_alpha(alpha, spec, x)
    h = x.shape[-1] // 2
    out_shape = x.shape[:-1] + (h,)
    if x.numel() == 0:
        return phi_composed(x[..., :h], spec, alpha_t) * x[..., h:]
    y = _apply(_as_rows(x, be == "triton"), None, alpha_t, spec, True, be)
    return y.view(out_shape)
