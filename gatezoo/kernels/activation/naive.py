"""The readable oracle of the gated-activation / GLU family (see docs/architecture.md, 'The math').

``phi(a)`` is written the way one would in eager PyTorch, from ordinary autograd ops
(``F.silu(a)``, ``(1 + 2 alpha) * sigmoid(a) - alpha`` ...), and autograd differentiates it. It
is the float64 oracle in the tests, the "eager" peer in the benchmarks, what ``torch.compile``
traces, and what the fused backward passes differentiate for second-order gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kinds import ARCTAN, IDENTITY, NORMCDF, RELU, SIGMOID, ActKind


def expand(g: torch.Tensor, alpha) -> torch.Tensor:
    """``expand(g, alpha) = (1 + 2 alpha) g - alpha``: stretches a (0, 1) gate to (-alpha, 1 + alpha)."""
    return (1 + 2 * alpha) * g - alpha


def gate_composed(a: torch.Tensor, spec: ActKind) -> torch.Tensor:
    """The gate g(a) of ``spec`` as a plain composition (sigmoid, arctan/pi + 1/2 or Phi)."""
    if spec.gate == SIGMOID:
        return torch.sigmoid(a)
    if spec.gate == ARCTAN:
        return torch.atan(a) / math.pi + 0.5
    if spec.gate == NORMCDF:
        return 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
    raise ValueError(f"{spec.name} has no gate")


def phi_composed(a: torch.Tensor, spec: ActKind, alpha=None) -> torch.Tensor:
    """phi(a) written the way a user would in eager PyTorch (autograd saves what it likes)."""
    if spec.gate == IDENTITY:
        return a
    if spec.gate == RELU:
        return F.relu(a)
    if alpha is None:
        if spec.name == "silu":
            return F.silu(a)
        if spec.name == "gelu":
            return F.gelu(a)
        g = gate_composed(a, spec)
    else:
        g = expand(gate_composed(a, spec), alpha)
    return a * g if spec.order == 2 else g
