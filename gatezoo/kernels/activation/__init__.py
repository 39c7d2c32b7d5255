"""Gated activations and GLUs with expanded gates (Huang 2024; Shazeer 2020).

``phi(a)`` is one row of :data:`KINDS` (see :mod:`.kinds`): ``expand(g(a), alpha)`` for
order-1 gates and ``a * expand(g(a), alpha)`` for order-2 gates, where
``expand(g, alpha) = (1 + 2 alpha) g - alpha`` and ``alpha = 0`` when not given.

* :func:`gated_act` - ``phi(x)`` (SiLU, GELU, ATLU and their expanded forms ...)
* :func:`glu` - ``phi(a) * b`` (GLU, Bilinear, ReGLU, GEGLU, SwiGLU, xSwiGLU ...)
* :func:`glu_packed` - ``phi(x[..., :h]) * x[..., h:]``, reading both halves in place

All three are differentiable in every tensor argument, ``alpha`` included, and save only
their inputs for backward.

Files (the layout every op copies, see docs/architecture.md, 'Layers and layout'):

* ``kinds.py`` - the activation table (gate, order, whether alpha applies) and its values at
  +-inf, the limits of each formula (:func:`~.kinds.limits`, docs/activation.md).
* ``naive.py`` - the readable composition :func:`phi_composed`, the oracle, and
  :func:`~.naive.phi_defined`, the same with the documented values at +-inf and NaN (what
  ``torch.compile`` traces).
* ``packing.py`` - argument helpers shared by the two autograd functions.
* ``torch_path.py`` - :class:`GatedActFunction`, the chunked, memory-lean torch backend.
* ``triton.py`` - the fused Triton kernels and their autograd function.
* ``__init__.py`` - validation and :func:`~gatezoo.kernels.backend.dispatch` (this file).
"""

from __future__ import annotations

import numbers

import torch

from ..backend import dispatch
from .kinds import IDENTITY, KINDS, ActKind, get_kind
from .naive import phi_composed, phi_defined
from .torch_path import GatedActFunction

__all__ = ["KINDS", "ActKind", "gated_act", "glu", "glu_packed", "phi_composed"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _run(backend: str, x: torch.Tensor, b, alpha, spec: ActKind, packed: bool, out_shape, naive, empty: bool):
    """Dispatch one call: the autograd functions work on 2-D row views (unit column stride for
    Triton) and their result is viewed back as ``out_shape``."""

    def torch_path():
        rows_b = None if b is None else _as_rows(b, False)
        return GatedActFunction.apply(_as_rows(x, False), rows_b, alpha, spec, packed).view(out_shape)

    def triton_path():
        from .triton import GatedActTriton

        rows_b = None if b is None else _as_rows(b, True)
        return GatedActTriton.apply(_as_rows(x, True), rows_b, alpha, spec, packed).view(out_shape)

    return dispatch(backend, x, naive=naive, torch_path=torch_path, triton_path=triton_path, empty=empty)


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
    alpha_t = _check_alpha(alpha, spec, x)
    # identity computes nothing: the naive path returns a view of x, as nn.Identity does
    return _run(backend, x, None, alpha_t, spec, False, x.shape,
                naive=lambda: phi_defined(x, spec, alpha_t).view_as(x),
                empty=x.numel() == 0 or spec.gate == IDENTITY)


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
    alpha_t = _check_alpha(alpha, spec, a)
    return _run(backend, a, b, alpha_t, spec, False, a.shape,
                naive=lambda: phi_defined(a, spec, alpha_t) * b, empty=a.numel() == 0)


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
    alpha_t = _check_alpha(alpha, spec, x)
    h = x.shape[-1] // 2
    return _run(backend, x, None, alpha_t, spec, True, x.shape[:-1] + (h,),
                naive=lambda: phi_defined(x[..., :h], spec, alpha_t) * x[..., h:], empty=x.numel() == 0)
