"""gatezoo: gated attention, gated activation and gating blocks for transformers.

Layers (imports go one way): :mod:`gatezoo.kernels` (functional ops, Triton + PyTorch),
:mod:`gatezoo.blocks` (nn.Modules), :mod:`gatezoo.models`, :mod:`gatezoo.train`,
:mod:`gatezoo.eval`.
"""

from . import blocks, kernels
from .blocks import GatedAct, GLUFeedForward, Mlp
from .kernels import gated_act, glu, glu_packed

__version__ = "0.2.0.dev0"
__all__ = ["GLUFeedForward", "GatedAct", "Mlp", "blocks", "gated_act", "glu", "glu_packed", "kernels", "__version__"]
