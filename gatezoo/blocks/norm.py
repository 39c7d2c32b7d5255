"""Normalisation modules: RMSNorm and the gated RMSNorm of ReLA-g.

``dim`` must be a positive int and ``eps`` a finite number > 0, checked when the module is
built; the forward takes a floating-point tensor (..., dim).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gatezoo.kernels import gated_rms_norm, rms_norm

from .checks import check_backend, check_features, check_int, check_positive


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` over the last dim (weight init 1)."""

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.dim, self.eps, self.backend = check_int("dim", dim), check_positive("eps", eps), check_backend(backend)
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features("x", x, self.dim, "dim")
        return rms_norm(x, self.weight, self.eps, backend=self.backend)


class GatedRMSNorm(nn.Module):
    """ReLA-g's output norm ``g * x / rms(x) * sigmoid(w * x)``: ``weight`` (g) starts at 1 and
    ``gate_weight`` (w) at U(-sqrt(3/d), sqrt(3/d))."""

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.dim, self.eps, self.backend = check_int("dim", dim), check_positive("eps", eps), check_backend(backend)
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.gate_weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = math.sqrt(3.0 / self.gate_weight.numel())
        nn.init.uniform_(self.gate_weight, -bound, bound)
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features("x", x, self.dim, "dim")
        return gated_rms_norm(x, self.weight, self.gate_weight, self.eps, backend=self.backend)
