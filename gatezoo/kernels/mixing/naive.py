"""The readable oracle of token mixing, the MLP that MLP-Mixer and NiNformer run along the
token axis (see docs/architecture.md, 'The math').

For x of shape (B, N, C) (N tokens, C channels), per batch element, with no transposes:

    A = W1 x + b1            (Hd, C)   W1: (Hd, N), b1: (Hd,)
    H = GELU(A)                         exact (erf) GELU, as ``nn.GELU()``
    Y = W2 H + b2            (N, C)    W2: (N, Hd), b2: (N,)
    Y = Y + residual                    optional
    Y = Y * gate                        optional (e.g. gMLP's spatial gating unit)

:func:`token_mixing_composed` is that plain composition: the oracle in tests, the eager peer
in benchmarks, what ``torch.compile`` traces and what the backward passes differentiate for
second-order gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_mixing_composed(x, w1, b1, w2, b2, residual=None, gate=None):
    """The token-mixing MLP as a plain composition that autograd differentiates."""
    a = torch.matmul(w1, x)
    if b1 is not None:
        a = a + b1[:, None]
    y = torch.matmul(w2, F.gelu(a))
    if b2 is not None:
        y = y + b2[:, None]
    if residual is not None:
        y = y + residual
    if gate is not None:
        y = y * gate
    return y
