"""nn.Modules built on :mod:`gatezoo.kernels`: gated activations and feed-forwards."""

from .feedforward import GLU_VARIANTS, GatedAct, GLUFeedForward, Mlp, glu_hidden_features

__all__ = ["GLU_VARIANTS", "GatedAct", "GLUFeedForward", "Mlp", "glu_hidden_features"]
