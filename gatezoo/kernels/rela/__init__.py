"""ReLA, rectified linear attention: ``relu(q k^T * scale) v`` with masks, causal decoding
and grouped-query attention (see :mod:`.naive` for the exact definition).

Files (the layout every op copies, see docs/architecture.md, 'Layers and layout'):

* ``naive.py`` - :func:`rela_composed` over the full score matrix, the oracle.
* ``dropout.py`` - the position hash that decides which attention weights dropout drops.
* ``torch_path.py`` - :class:`~.torch_path.ReLAFunction`, the chunked torch backend.
* ``triton.py`` - the fused Triton kernels (forward, dK/dV, dQ) and their autograd function.
* ``__init__.py`` - validation and :func:`~gatezoo.kernels.backend.dispatch` (this file).
"""

from __future__ import annotations

import torch

from ..backend import dispatch, positive_number
from .dropout import check_dropout, draw_seed
from .naive import rela_composed
from .torch_path import ReLAFunction

__all__ = ["MAX_HEAD_DIM", "rela_attention", "rela_composed"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q, k, v, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    b, h, _, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k and v must have batch {b} like q, got {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k and v must have head_dim {d} like q, got {k.shape[3]}")
    if k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(f"k and v heads ({k.shape[1]}) must divide q heads ({h}) (grouped-query attention)")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {d}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
            raise TypeError(f"key_padding_mask must be a bool tensor (True = keep), got {got}")
        if tuple(key_padding_mask.shape) != (b, k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, key_len) = {(b, k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def rela_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                   dropout_p: float = 0.0, dropout_seed: int | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Rectified linear attention: ``relu(q k^T * scale) v``, no normalisation over keys.

    Args:
        q: (B, H, Tq, D) queries.
        k, v: (B, Hk, Tk, D) keys and values; ``Hk`` must divide ``H`` (grouped-query attention).
        causal: mask future keys. With ``Tq != Tk`` the mask is aligned bottom-right: query ``i``
            sees keys ``j <= i + Tk - Tq``, which is what incremental decoding needs.
        key_padding_mask: bool (B, Tk), **True = keep** (a real token), False = padding.
        scale: score scale, default ``D ** -0.5``.
        dropout_p: attention-weight dropout, a number in [0, 1): each weight ``relu(S)[i, j]`` is
            dropped with probability ``dropout_p`` and the kept ones are scaled by
            ``1/(1 - dropout_p)`` (as ReLA's authors train). 0 (the default) is no dropout and
            costs nothing. The op has no training flag: pass 0 for evaluation.
        dropout_seed: int in [0, 2**32). Which weights are dropped is a hash of (seed, batch·head,
            query, key) (see :mod:`gatezoo.kernels.rela.dropout`), so every backend drops the
            same ones and backward recomputes the mask instead of storing it. None (default)
            draws a seed from torch's default generator when ``dropout_p > 0``, so
            ``torch.manual_seed`` repeats a run.
        backend: ``"auto" | "torch" | "triton"``.

    Masked scores are set to 0 before the ReLU, so a query whose keys are all masked gets 0.
    D may be any size up to 256. Returns (B, H, Tq, D) in q's dtype. The Triton kernels multiply
    float32 inputs as TF32 on the tensor cores; the torch path is exact float32.
    """
    _check(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else positive_number("scale", scale)
    causal = bool(causal)
    dropout_p, dropout_seed = check_dropout(dropout_p, dropout_seed)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device)
    if dropout_p > 0 and dropout_seed is None:
        if torch.compiler.is_compiling():
            # a seed tensor: reading it into an int would be a host sync the trace cannot hold;
            # the composition (what a trace runs) hashes with a tensor seed as well
            dropout_seed = torch.randint(0, 1 << 32, (), dtype=torch.int64).to(q.device)
        else:
            dropout_seed = draw_seed()

    def triton_path():
        from .triton import ReLATriton

        return ReLATriton.apply(q, k, v, key_padding_mask, causal, scale, dropout_p, dropout_seed)

    return dispatch(
        backend, q,
        naive=lambda: rela_composed(q, k, v, causal, key_padding_mask, scale, dropout_p, dropout_seed),
        torch_path=lambda: ReLAFunction.apply(q, k, v, key_padding_mask, causal, scale, dropout_p, dropout_seed),
        triton_path=triton_path,
        empty=q.numel() == 0 or k.shape[2] == 0,
    )
