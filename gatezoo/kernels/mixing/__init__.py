"""Token mixing: the MLP that MLP-Mixer and NiNformer run along the token axis, with optional
residual and gate fused into its epilogue (see :mod:`.naive` for the exact definition).

Files (the layout every op copies, see docs/architecture.md, 'Layers and layout'):

* ``naive.py`` - :func:`token_mixing_composed`, the plain composition and oracle, and
  :func:`~.naive.token_mixing_defined`, the same with GELU defined at +-inf and NaN.
* ``torch_path.py`` - :class:`~.torch_path.TokenMixingFunction`, the lean torch backend, and
  ``composed_args``, which both autograd functions use for second-order gradients.
* ``triton.py`` - the fused Triton kernels (whole token axis in one tile) and their autograd
  function; ``max_tokens`` gives the longest token axis they take.
* ``__init__.py`` - validation, autocast and :func:`~gatezoo.kernels.backend.dispatch` (this file).
"""

from __future__ import annotations

import torch

from ..backend import dispatch
from .naive import token_mixing_composed, token_mixing_defined
from .torch_path import TokenMixingFunction

__all__ = ["token_mixing", "token_mixing_composed"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x, w1, b1, w2, b2, residual, gate):
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, tokens, channels), got {tuple(x.shape)}")
    _, n, _ = x.shape
    for name, t, shape in (("w1", w1, None), ("w2", w2, None), ("b1", b1, None), ("b2", b2, None),
                           ("residual", residual, tuple(x.shape)), ("gate", gate, tuple(x.shape))):
        if t is None:
            if name in ("w1", "w2"):
                raise TypeError(f"{name} must be a tensor, got None")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have x's shape {shape}, got {tuple(t.shape)}")
    if w1.dim() != 2 or w1.shape[1] != n:
        raise ValueError(f"w1 must have shape (hidden, tokens) = (*, {n}), got {tuple(w1.shape)}")
    hd = w1.shape[0]
    if tuple(w2.shape) != (n, hd):
        raise ValueError(f"w2 must have shape (tokens, hidden) = {(n, hd)}, got {tuple(w2.shape)}")
    if b1 is not None and tuple(b1.shape) != (hd,):
        raise ValueError(f"b1 must have shape (hidden,) = ({hd},), got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (n,):
        raise ValueError(f"b2 must have shape (tokens,) = ({n},), got {tuple(b2.shape)}")


def token_mixing(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None, *, residual: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """MLP along the token axis: ``(W2 GELU(W1 x + b1) + b2 + residual) * gate``.

    Args:
        x: (B, N, C) tokens by channels (the usual layout; no transpose is needed or made).
        w1, b1: (Hd, N) and (Hd,) or None, the first layer (``nn.Linear(N, Hd)``'s weight/bias).
        w2, b2: (N, Hd) and (N,) or None, the second layer.
        residual: optional (B, N, C) added to the output (MLP-Mixer's skip connection).
        gate: optional (B, N, C) multiplying the result (a gating unit's gate product).
        backend: ``"auto" | "torch" | "triton"``.

    GELU is the exact (erf) form of ``nn.GELU()``. Every tensor must share x's dtype and
    device; under autocast all are cast to the autocast dtype first, as a matmul would be.
    Both paths accumulate in float32 (float64 for float64 inputs) and return x's dtype. The
    Triton kernels hold the whole token axis in one tile (N up to 128 in float16/bfloat16, 64
    in float32; longer inputs take the torch path); they multiply float32 as TF32 unless
    ``torch.get_float32_matmul_precision()`` is ``"highest"`` (PyTorch's default). The torch
    path saves x and the pre-activation (one hidden-sized tensor where autograd of the
    composition keeps two).
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        # as a matmul would: run in the autocast dtype (the kernels still accumulate in float32)
        dt = torch.get_autocast_dtype(x.device.type)
        x, w1, b1, w2, b2, residual, gate = (
            t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (x, w1, b1, w2, b2, residual, gate))
        with torch.autocast(x.device.type, enabled=False):
            return token_mixing(x, w1, b1, w2, b2, residual=residual, gate=gate, backend=backend)
    _check(x, w1, b1, w2, b2, residual, gate)
    args = (x, w1, b1, w2, b2, residual, gate)

    def triton_unsupported():
        from .triton import max_tokens

        if x.dtype == torch.float64 or x.shape[1] > max_tokens(x.dtype):
            return ValueError, ("needs float16/bfloat16 x with at most 128 tokens or float32 x "
                                f"with at most 64, got {x.dtype} with {x.shape[1]}")
        return None

    def triton_path():
        from .triton import TokenMixingTriton

        return TokenMixingTriton.apply(*args)

    return dispatch(
        backend, x,
        naive=lambda: token_mixing_defined(*args),
        torch_path=lambda: TokenMixingFunction.apply(*args),
        triton_path=triton_path,
        triton_unsupported=triton_unsupported,
        empty=x.numel() == 0,
    )
