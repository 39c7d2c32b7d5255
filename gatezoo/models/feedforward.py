"""The one factory of the models' feed-forward sub-layers, shared by the vision and translation
models so that a feed-forward name means the same layer in both."""

from __future__ import annotations

from torch import nn

from gatezoo.blocks import GLUFeedForward, Mlp

from .moe import MoEOptions, moe_feedforward


def glu_width(mlp_hidden: int) -> int:
    """The hidden width of a GLU that replaces an MLP of hidden width ``mlp_hidden`` with the same
    parameter count: 2/3 of it, rounded up to a multiple of 8 (tensor-core tiles)."""
    return (mlp_hidden * 2 // 3 + 7) // 8 * 8


def build_feedforward(ffn: str, dim: int, mlp_hidden: int, drop: float, moe: MoEOptions | None = None) -> nn.Module:
    """The feed-forward named ``ffn`` over ``dim`` channels.

    ``mlp-<activation>`` is a two-layer MLP of hidden width ``mlp_hidden``; a GLU name a GLU
    feed-forward of :func:`glu_width` ``(mlp_hidden)``; ``moe`` a mixture of experts set up by the
    :class:`~gatezoo.models.moe.MoEOptions` ``moe`` (the model's config), its experts sized to
    that GLU's active parameters. The names are checked by the configs before this is called."""
    if ffn.startswith("mlp-"):
        return Mlp(dim, mlp_hidden, act_layer=ffn[4:], drop=drop)
    hidden = glu_width(mlp_hidden)
    if ffn == "moe":
        if moe is None:
            raise ValueError("ffn='moe' needs the MoE options of the model's config (moe=...)")
        return moe_feedforward(moe, dim, hidden, drop)
    return GLUFeedForward(dim, hidden, kind=ffn, drop=drop)
