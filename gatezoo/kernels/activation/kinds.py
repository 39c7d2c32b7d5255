"""The activation table shared by the naive composition, the torch path and the Triton kernels.

Every kind is a gate ``g`` with range (0, 1) and an order: order 1 gives
``phi(a) = expand(g(a), alpha)``, order 2 gives ``phi(a) = a * expand(g(a), alpha)``, with
``expand(g, alpha) = (1 + 2 alpha) g - alpha`` (Huang 2024) and ``alpha = 0`` when not given.
``identity`` (Bilinear) and ``relu`` (ReGLU) have no gate and take no ``alpha``.

At +inf, -inf and NaN every kind gives the values of :func:`limits` (docs/activation.md,
'Special values'): the limits of its formula, never what a floating-point evaluation of that
formula happens to give. A formula evaluated at an infinite input hits ``inf * 0`` or
``inf - inf`` (GELU at -inf is ``-inf * Phi(-inf)``), and what PyTorch's CPU kernels return
there depends on the machine: ATen hands a contiguous float32 GELU to oneDNN, whose just-in-time
kernel gives NaN at +inf with AVX-512 and +inf with AVX2. So every path (the chunked torch path,
the Triton kernels, the composition that ``torch.compile`` traces) computes at the finite inputs
only and writes the values of :func:`limits` at the others.

With ``c+ = lim a (1 - g(a))`` as a -> +inf and ``c- = lim a g(a)`` as a -> -inf (``+0`` and
``-0`` for the sigmoid and the normal CDF, whose tails vanish faster than ``1/a``; ``1/pi`` and
``-1/pi`` for the arctan gate, since ``A(a) = 1/2 + arctan(a)/pi`` approaches 0 and 1 like
``1/(pi |a|)``), and ``s = 1 + 2 alpha``:

* order 1, ``phi = s g - alpha``: ``phi(+inf) = 1 + alpha``, ``phi(-inf) = -alpha`` (+0 at
  alpha = 0); ``phi'(+-inf) = 0``; ``dphi/dalpha = 2g - 1`` is +1 and -1.
* order 2, ``phi = a (s g - alpha) = (1 + alpha) a - s a (1 - g) = s a g - alpha a``:
  ``phi(+inf)`` is +inf for alpha > -1, -inf for alpha < -1 and ``c+`` at alpha = -1;
  ``phi(-inf)`` is +inf for alpha > 0, -inf for alpha < 0 and ``c-`` at alpha = 0 (so SiLU
  and GELU give -0 and ATLU -1/pi); ``phi' = s g - alpha + s a g'`` tends to ``1 + alpha`` and
  ``-alpha`` (``a g'(a)`` vanishes at both ends for all three gates); ``dphi/dalpha = a (2g - 1)``
  tends to +inf at both ends.
* ``relu``: +inf and 0, slopes 1 and 0; ``identity``: +-inf, slope 1 (plain IEEE arithmetic
  already gives these, nothing is pinned).

A non-finite alpha makes phi NaN at every input, the infinite ones included. NaN in gives NaN
out, and every gradient it feeds is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Gate ids, also the values of the GATE constexpr in the Triton kernels.
SIGMOID, ARCTAN, NORMCDF, IDENTITY, RELU = range(5)


@dataclass(frozen=True)
class ActKind:
    """One row of the activation table."""

    name: str
    gate: int
    order: int
    takes_alpha: bool
    glu_name: str  # the GLU variant this kind gives, in the papers' words

    @property
    def gate_name(self) -> str:
        """The gate in words: sigmoid, arctan, normcdf, identity or relu."""
        return ("sigmoid", "arctan", "normcdf", "identity", "relu")[self.gate]


KINDS: dict[str, ActKind] = {
    k.name: k
    for k in (
        ActKind("sigmoid", SIGMOID, 1, True, "GLU"),
        ActKind("arctan", ARCTAN, 1, True, "ATGLU-1"),
        ActKind("normcdf", NORMCDF, 1, True, "Phi-GLU"),
        ActKind("identity", IDENTITY, 1, False, "Bilinear"),
        ActKind("relu", RELU, 1, False, "ReGLU"),
        ActKind("silu", SIGMOID, 2, True, "SwiGLU"),
        ActKind("gelu", NORMCDF, 2, True, "GEGLU"),
        ActKind("atlu", ARCTAN, 2, True, "ATGLU"),
    )
}


def get_kind(kind: str) -> ActKind:
    """Look up ``kind`` in :data:`KINDS`, raising ``ValueError`` that lists the valid names."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


INF, NAN = math.inf, math.nan

# (c+, c-) per gate: lim a (1 - g(a)) at +inf and lim a g(a) at -inf
TAILS = {SIGMOID: (0.0, -0.0), NORMCDF: (0.0, -0.0), ARCTAN: (1.0 / math.pi, -1.0 / math.pi)}


class Limits(NamedTuple):
    """phi, phi' and dphi/dalpha at +inf and at -inf: floats, or 0-dim tensors when alpha is a
    tensor (so that ``torch.compile`` traces them without reading alpha on the host)."""

    phi_pos: float
    phi_neg: float
    slope_pos: float
    slope_neg: float
    dalpha_pos: float
    dalpha_neg: float


def _where(cond, x, y):
    return torch.where(cond, x, y) if isinstance(cond, torch.Tensor) else (x if cond else y)


def _finite(al):
    return torch.isfinite(al) if isinstance(al, torch.Tensor) else math.isfinite(al)


def limits(spec: ActKind, alpha=None) -> Limits:
    """The values at +-inf of ``spec`` with expansion ``alpha`` (None, a float or a 0-dim
    tensor); see the module docstring for the derivation."""
    if spec.gate == IDENTITY:
        return Limits(INF, -INF, 1.0, 1.0, 0.0, 0.0)
    if spec.gate == RELU:
        return Limits(INF, 0.0, 1.0, 0.0, 0.0, 0.0)
    al = 0.0 if alpha is None else alpha
    s = 1.0 + 2.0 * al
    if spec.order == 1:
        # s * 1 - alpha and s * 0 - alpha, as the formula gives at g = 1 and g = 0 (NaN for a
        # non-finite alpha, +0 rather than -0 at alpha = 0)
        return Limits(s * 1.0 - al, s * 0.0 - al, 0.0, 0.0, 1.0, -1.0)
    c_pos, c_neg = TAILS[spec.gate]
    ok = _finite(al)
    phi_pos = _where(1.0 + al > 0, INF, _where(1.0 + al < 0, -INF, c_pos))
    phi_neg = _where(al > 0, INF, _where(al < 0, -INF, c_neg))
    return Limits(_where(ok, phi_pos, NAN), _where(ok, phi_neg, NAN),
                  _where(ok, 1.0 + al, NAN), _where(ok, 0.0 - al, NAN), INF, INF)
