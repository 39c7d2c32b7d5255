"""The readable oracle of the gated-activation / GLU family (see docs/architecture.md, 'The math').

``phi(a)`` is written the way one would in eager PyTorch, from ordinary autograd ops
(``F.silu(a)``, ``(1 + 2 alpha) * sigmoid(a) - alpha`` ...), and autograd differentiates it:
:func:`phi_composed` is the float64 oracle in the tests (at finite inputs) and the "eager" peer
in the benchmarks. :func:`phi_defined` is the same composition with the documented values at
+-inf and NaN written in (:func:`~.kinds.limits`), gradients included: it is what ``torch.compile``
traces and what the fused backward passes differentiate for second-order gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kinds import ARCTAN, IDENTITY, NORMCDF, RELU, SIGMOID, ActKind, limits


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


def gate_slope_composed(a: torch.Tensor, spec: ActKind) -> torch.Tensor:
    """g'(a) of ``spec``'s gate: sigma (1 - sigma), 1 / (pi (1 + a^2)) or the normal density."""
    if spec.gate == SIGMOID:
        s = torch.sigmoid(a)
        return s * (1.0 - s)
    if spec.gate == ARCTAN:
        return 1.0 / (math.pi * (1.0 + a * a))
    if spec.gate == NORMCDF:
        return torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    raise ValueError(f"{spec.name} has no gate")


def _slope_and_dalpha(a: torch.Tensor, spec: ActKind, alpha):
    """(phi'(a), dphi/dalpha(a)) as compositions (differentiable again, for double backward)."""
    if spec.gate == RELU:
        return (a > 0).to(a.dtype), None
    g, gs = gate_composed(a, spec), gate_slope_composed(a, spec)
    scale = 1.0 if alpha is None else 1.0 + 2.0 * alpha
    t = 2.0 * g - 1.0
    if spec.order == 1:
        return scale * gs, t
    e = g if alpha is None else expand(g, alpha)
    return e + scale * a * gs, a * t


class _PhiDefined(torch.autograd.Function):
    """phi(a) at the finite elements of ``a`` (through :func:`phi_composed`), the limits of
    :func:`~.kinds.limits` at the infinite ones and NaN at the NaN ones. Its backward is the product
    ``w * phi'(a)`` of the incoming gradient with the slope (its limit at +-inf), formed in one
    multiplication as the fused paths do: autograd through the composition would form
    ``w e + (w a) g'``, which turns an infinite ``w`` into inf - inf or inf * 0 where phi' itself
    is finite. The slope is itself a composition, so double backward works."""

    @staticmethod
    def forward(ctx, a, alpha, spec: ActKind):
        a_fin = torch.where(torch.isfinite(a), a, 0.0)
        y = F.relu(a_fin) if spec.gate == RELU else phi_composed(a_fin, spec, alpha)
        lim = limits(spec, alpha)
        ctx.save_for_backward(a, alpha)
        ctx.spec = spec
        return _pinned(a, y, lim.phi_pos, lim.phi_neg)

    @staticmethod
    def backward(ctx, w):
        a, alpha = ctx.saved_tensors
        spec = ctx.spec
        lim = limits(spec, alpha)
        slope, t = _slope_and_dalpha(torch.where(torch.isfinite(a), a, 0.0), spec, alpha)
        da = w * _pinned(a, slope, lim.slope_pos, lim.slope_neg)
        dalpha = None
        if alpha is not None and ctx.needs_input_grad[1]:
            dalpha = (w * _pinned(a, t, lim.dalpha_pos, lim.dalpha_neg)).sum()
            dalpha = dalpha.to(alpha.dtype).reshape(alpha.shape)
        return da, dalpha, None


def _pinned(a, x, at_pos, at_neg):
    """x with at_pos where a is +inf, at_neg where a is -inf and NaN where a is NaN."""
    x = torch.where(torch.isnan(a), a, x)
    return torch.where(a == math.inf, at_pos, torch.where(a == -math.inf, at_neg, x)).to(x.dtype)


def phi_defined(a: torch.Tensor, spec: ActKind, alpha=None) -> torch.Tensor:
    """:func:`phi_composed` with the values docs/activation.md defines at +-inf and NaN
    (:func:`~.kinds.limits`), forward and backward, whatever the machine's kernels give there;
    its gradient is ``w * phi'(a)``, one product as in the fused paths. For ``relu`` that product
    is ``w * step(a)``, so an infinite or NaN upstream gradient at ``a <= 0`` gives NaN as it does
    for every other kind (``F.relu``'s backward selects, and would give 0)."""
    if spec.gate == IDENTITY:  # a itself: IEEE arithmetic is already right at +-inf and NaN
        return a
    if alpha is not None and not isinstance(alpha, torch.Tensor):
        alpha = torch.tensor(float(alpha), dtype=a.dtype, device=a.device)
    return _PhiDefined.apply(a, alpha, spec)
