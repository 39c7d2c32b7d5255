"""The torch backend of RMSNorm and gated RMSNorm.

:class:`RMSNormFunction` computes in float32 (float64 for float64 inputs), returns x's dtype,
saves only its inputs and recomputes ``1 / rms`` and the gate in backward. It must match
:func:`~.naive.rms_norm_composed` and :func:`~.naive.gated_rms_norm_composed`, which also give
its second-order gradients.
"""

from __future__ import annotations

import torch

from ..backend import composed_grads
from .naive import norm_composed


def in_compute_dtype(t):
    """``t`` in the dtype the norms compute in: float32, or float64 for float64 input."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sum_rows(t):
    return t.reshape(-1, t.shape[-1]).sum(0)


class RMSNormFunction(torch.autograd.Function):
    """``w * x / rms(x) [* sigmoid(u * x)]``; ``gate_weight`` None for plain RMSNorm."""

    @staticmethod
    def forward(ctx, x, weight, gate_weight, eps: float):
        xc = in_compute_dtype(x)
        n = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
        y = n.mul_(in_compute_dtype(weight))
        if gate_weight is not None:
            y.mul_(torch.sigmoid(xc * in_compute_dtype(gate_weight)))
        ctx.eps = eps
        ctx.save_for_backward(x, weight, gate_weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate_weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, norm_composed, (x, weight, gate_weight, ctx.eps), dy)
        xc, w, dyc = in_compute_dtype(x), in_compute_dtype(weight), in_compute_dtype(dy)
        r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + ctx.eps)
        n = xc * r
        gn = dyc * w  # gradient reaching n, before the gate
        dgate = None
        if gate_weight is not None:
            u = in_compute_dtype(gate_weight)
            s = torch.sigmoid(xc * u)
            dgate = gn * n * s * (1.0 - s)  # dL/d(u x)
            gn = gn * s
        dx = r * (gn - n * (gn * n).mean(-1, keepdim=True))
        if dgate is not None:
            dx = dx + dgate * u
        dw = _sum_rows(dyc * n * (s if gate_weight is not None else 1.0))
        du = _sum_rows(dgate * xc) if gate_weight is not None else None
        return (
            dx.to(x.dtype),
            dw.to(weight.dtype),
            None if du is None else du.to(gate_weight.dtype),
            None,
        )
