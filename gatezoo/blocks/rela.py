"""``ReLAAttention``, the block of the ``rela`` op (:func:`gatezoo.kernels.rela_attention`):
rectified linear attention (Zhang, Titov & Sennrich 2021) with its output norm, behind the same
interface as :class:`~gatezoo.blocks.SoftmaxAttention` (see :mod:`gatezoo.blocks.attention`):

    forward(x, context=None, key_padding_mask=None, causal=False, cache=None)

The math is in docs/architecture.md, "ReLA, rectified linear attention"; docs/rela.md says how to
use it and what the translation experiments found.
"""

from __future__ import annotations

from torch import nn

from gatezoo.kernels import rela_attention

from .attention import _Attention
from .checks import ArgumentTypeError, check_backend
from .norm import GatedRMSNorm, RMSNorm


class ReLAAttention(_Attention):
    """Rectified linear attention (Zhang, Titov & Sennrich 2021): ``relu(q k^T / sqrt(d)) v``
    per head, then an output norm over the concatenated heads, then ``proj``.

    Args:
        dim: model width. heads: query heads. head_dim: default dim // heads.
        kv_heads: key/value heads (grouped-query attention), default ``heads``.
        norm: ``"gated_rms"`` (ReLA-g, default), ``"rms"``, ``"layer"`` or None.
        dropout: on the block output. bias: on the projections.
        backend: kernel backend for the attention and the norm.
        attn_dropout: dropout on the rectified weights ``relu(S)`` before they multiply the
            values, in training mode only (0 = none; ReLA's authors train with 0.1). Each call
            draws its mask's seed from torch's generator (:func:`~gatezoo.kernels.rela_attention`).
    """

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, kv_heads: int | None = None,
                 norm: str | None = "gated_rms", dropout: float = 0.0, bias: bool = False, backend: str = "auto",
                 attn_dropout: float = 0.0):
        super().__init__(dim, heads, head_dim=head_dim, kv_heads=kv_heads, dropout=dropout, bias=bias,
                         attn_dropout=attn_dropout)
        check_backend(backend)
        if norm is not None and not isinstance(norm, str):
            raise ArgumentTypeError(f"norm must be a str or None, got {norm!r} ({type(norm).__name__})")
        width = self.heads * self.head_dim
        norms = {
            "gated_rms": lambda: GatedRMSNorm(width, backend=backend),
            "rms": lambda: RMSNorm(width, backend=backend),
            "layer": lambda: nn.LayerNorm(width),
            None: nn.Identity,
        }
        if norm not in norms:
            raise ValueError(f"norm must be one of {list(norms)}, got {norm!r}")
        self.norm = norms[norm]()
        self.backend = backend

    def _attend(self, q, k, v, key_padding_mask, causal):
        return rela_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=self._attn_p(),
                              backend=self.backend)

    def _output_norm(self, o):
        return self.norm(o)

    def extra_repr(self) -> str:
        return f"attn_dropout={self.attn_dropout}" if self.__dict__.get("attn_dropout", 0.0) else ""
