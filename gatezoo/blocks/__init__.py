"""nn.Modules built on :mod:`gatezoo.kernels`: gated activations, feed-forwards, norms and
attention."""

from .attention import KVCache, ReLAAttention, SoftmaxAttention
from .feedforward import GLU_VARIANTS, GatedAct, GLUFeedForward, Mlp, glu_hidden_features
from .norm import GatedRMSNorm, RMSNorm

__all__ = [
    "GLU_VARIANTS", "GatedAct", "GatedRMSNorm", "GLUFeedForward", "KVCache", "Mlp", "ReLAAttention", "RMSNorm",
    "SoftmaxAttention", "glu_hidden_features",
]
