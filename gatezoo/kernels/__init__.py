"""Functional ops on tensors: fused Triton kernels, their PyTorch references and autograd.

Every op takes ``backend="auto" | "torch" | "triton"`` (DESIGN.md §2): Triton on CUDA tensors,
the memory-lean PyTorch path elsewhere. ``GATEZOO_BACKEND`` sets the default.
"""

from .activation import KINDS, ActKind, gated_act, glu, glu_packed
from .backend import BACKENDS, resolve_backend, triton_available
from .mixing import token_mixing
from .norm import gated_rms_norm, rms_norm
from .rela import rela_attention

__all__ = [
    "BACKENDS", "KINDS", "ActKind", "gated_act", "gated_rms_norm", "glu", "glu_packed", "rela_attention",
    "resolve_backend", "rms_norm", "token_mixing", "triton_available",
]
