"""nn.Modules built on :mod:`gatezoo.kernels`: gated activations, feed-forwards, norms,
attention and token-mixing (MLP-Mixer, NiNformer) blocks."""

from .attention import KVCache, ReLAAttention, SoftmaxAttention
from .feedforward import (
    GLU_FAMILIES,
    GLU_VARIANTS,
    MLP_ACTIVATIONS,
    GatedAct,
    GLUFeedForward,
    Mlp,
    glu_hidden_features,
    glu_variant,
)
from .mixer import MixerBlock, NiNBlock, TokenMixing
from .norm import GatedRMSNorm, RMSNorm

__all__ = [
    "GLU_FAMILIES", "GLU_VARIANTS", "MLP_ACTIVATIONS", "GatedAct", "GatedRMSNorm", "GLUFeedForward", "KVCache",
    "MixerBlock", "Mlp", "NiNBlock",
    "ReLAAttention", "RMSNorm", "SoftmaxAttention", "TokenMixing", "glu_hidden_features",
    "glu_variant",
]
