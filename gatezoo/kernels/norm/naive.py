"""The readable oracle of RMSNorm and the gated RMSNorm of ReLA-g (Zhang, Titov & Sennrich 2021).

    rms_norm(x)       = w * x / rms(x)
    gated_rms_norm(x) = w * x / rms(x) * sigmoid(u * x)        over the last dim

with ``rms(x) = sqrt(mean(x^2) + eps)``: a zero row gives 0, never NaN. These plain
compositions are the float64 oracle in the tests, what ``torch.compile`` traces and what the
backward passes differentiate for second-order gradients (see docs/architecture.md, 'The math').
"""

from __future__ import annotations

import torch


def rms_norm_composed(x, weight, eps: float = 1e-6):
    """RMSNorm as a plain composition (the float64 oracle in tests)."""
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gated_rms_norm_composed(x, weight, gate_weight, eps: float = 1e-6):
    """Gated RMSNorm as a plain composition (the float64 oracle in tests)."""
    return rms_norm_composed(x, weight, eps) * torch.sigmoid(gate_weight * x)


def norm_composed(x, weight, gate_weight=None, eps: float = 1e-6):
    """:func:`rms_norm_composed`, or :func:`gated_rms_norm_composed` when ``gate_weight`` is
    given: both in the argument order of the autograd functions ``(x, weight, gate_weight, eps)``."""
    if gate_weight is None:
        return rms_norm_composed(x, weight, eps)
    return gated_rms_norm_composed(x, weight, gate_weight, eps)
