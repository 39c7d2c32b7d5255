"""RMSNorm and the gated RMSNorm that ReLA-g puts on the attention output.

Files (the layout every op copies, see docs/architecture.md, 'Layers and layout'):

* ``naive.py`` - :func:`rms_norm_composed` and :func:`gated_rms_norm_composed`, the oracles.
* ``torch_path.py`` - :class:`~.torch_path.RMSNormFunction`, the float32 torch backend.
* ``triton.py`` - the fused Triton kernels (whole rows per program) and their autograd function.
* ``__init__.py`` - validation and :func:`~gatezoo.kernels.backend.dispatch` (this file).
"""

from __future__ import annotations

import torch

from ..backend import dispatch, float64_unsupported, in_compute_dtype, positive_number
from .naive import gated_rms_norm_composed, norm_composed, rms_norm_composed
from .torch_path import RMSNormFunction

__all__ = ["gated_rms_norm", "gated_rms_norm_composed", "rms_norm", "rms_norm_composed"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x, named_weights, eps):
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the normalised one)")
    for name, w in named_weights:
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
        if tuple(w.shape) != (x.shape[-1],):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {w.device}")
    positive_number("eps", eps)


def _run(backend: str, x, weight, gate_weight, eps: float) -> torch.Tensor:
    def naive():
        # what torch.compile traces: the composition in the torch path's compute dtype and x's dtype out
        u = None if gate_weight is None else in_compute_dtype(gate_weight)
        return norm_composed(in_compute_dtype(x), in_compute_dtype(weight), u, eps).to(x.dtype)

    def triton_path():
        from .triton import RMSNormTriton

        return RMSNormTriton.apply(x, weight, gate_weight, eps)

    return dispatch(
        backend, x,
        naive=naive,
        torch_path=lambda: RMSNormFunction.apply(x, weight, gate_weight, eps),
        triton_path=triton_path,
        triton_unsupported=lambda: float64_unsupported(x, weight, gate_weight),
        empty=x.numel() == 0,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim (a zero row gives 0)."""
    _check(x, [("weight", weight)], eps)
    return _run(backend, x, weight, None, float(eps))


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, gate_weight: torch.Tensor, eps: float = 1e-6, *,
                   backend: str = "auto") -> torch.Tensor:
    """ReLA-g's output norm: ``weight * x / rms(x) * sigmoid(gate_weight * x)`` over the last dim.

    Args:
        x: (..., d) input, any floating dtype (computed in float32).
        weight: (d,) gain ``g`` (ReLA-g initialises it to 1).
        gate_weight: (d,) gate weight ``w`` (ReLA-g initialises it U(+-sqrt(3/d))).
        eps: added to the mean square, so a zero row gives 0 rather than NaN.
    """
    _check(x, [("weight", weight), ("gate_weight", gate_weight)], eps)
    return _run(backend, x, weight, gate_weight, float(eps))
