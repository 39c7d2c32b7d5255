"""The readable oracle of token mixing, the MLP that MLP-Mixer and NiNformer run along the
token axis (see docs/architecture.md, 'The math').

For x of shape (B, N, C) (N tokens, C channels), per batch element, with no transposes:

    A = W1 x + b1            (Hd, C)   W1: (Hd, N), b1: (Hd,)
    H = GELU(A)                         exact (erf) GELU, as ``nn.GELU()``
    Y = W2 H + b2            (N, C)    W2: (N, Hd), b2: (N,)
    Y = Y + residual                    optional
    Y = Y * gate                        optional (e.g. gMLP's spatial gating unit)

:func:`token_mixing_composed` is that plain composition: the oracle in tests (at finite inputs)
and the eager peer in benchmarks. :func:`token_mixing_defined` is the same with a GELU that gives
the values docs/activation.md defines at +-inf and NaN (GELU(+inf) = +inf, GELU(-inf) = -0,
slopes 1 and 0) whatever the machine's kernels do there: it is what ``torch.compile`` traces and
what the backward passes differentiate for second-order gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_mixing_composed(x, w1, b1, w2, b2, residual=None, gate=None):
    """The token-mixing MLP as a plain composition that autograd differentiates."""
    return _compose(x, w1, b1, w2, b2, residual, gate, F.gelu)


def token_mixing_defined(x, w1, b1, w2, b2, residual=None, gate=None):
    """:func:`token_mixing_composed` with the GELU defined at +-inf and NaN (docs/activation.md)."""
    return _compose(x, w1, b1, w2, b2, residual, gate, _DefinedGELU.apply)


def _pinned(a, x, at_pos, at_neg):
    """x with at_pos where a is +inf, at_neg where a is -inf and NaN where a is NaN."""
    x = torch.where(torch.isnan(a), a, x)
    return torch.where(a == math.inf, at_pos, torch.where(a == -math.inf, at_neg, x)).to(x.dtype)


class _DefinedGELU(torch.autograd.Function):
    """GELU at the finite elements, +inf / -0 / NaN at +inf / -inf / NaN; backward
    ``w * GELU'(a)``, one product with the slope (1 and 0 at +-inf), as the fused paths form it.
    The slope is a composition, so double backward works. (The activation op's ``phi_defined``
    gives the same for kind "gelu"; this op keeps its own, importing nothing from another op.)"""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return _pinned(a, F.gelu(torch.where(torch.isfinite(a), a, 0.0)), math.inf, -0.0)

    @staticmethod
    def backward(ctx, w):
        (a,) = ctx.saved_tensors
        a_fin = torch.where(torch.isfinite(a), a, 0.0)
        cdf = 0.5 * (1.0 + torch.erf(a_fin * math.sqrt(0.5)))
        slope = cdf + a_fin * torch.exp(-0.5 * a_fin * a_fin) / math.sqrt(2.0 * math.pi)  # Phi + a phi
        return w * _pinned(a, slope, 1.0, 0.0)


def _compose(x, w1, b1, w2, b2, residual, gate, gelu):
    a = torch.matmul(w1, x)
    if b1 is not None:
        a = a + b1[:, None]
    y = torch.matmul(w2, gelu(a))
    if b2 is not None:
        y = y + b2[:, None]
    if residual is not None:
        y = y + residual
    if gate is not None:
        y = y * gate
    return y
