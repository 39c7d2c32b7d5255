"""PyTorch reference for RMSNorm and the gated RMSNorm of ReLA-g (Zhang, Titov & Sennrich 2021).

    rms_norm(x)       = w * x / rms(x)
    gated_rms_norm(x) = w * x / rms(x) * sigmoid(u * x)        over the last dim

with ``rms(x) = sqrt(mean(x^2) + eps)``: a zero row gives 0, never NaN. The autograd functions
save only their inputs and recompute ``1 / rms`` and the gate in backward.
"""

from __future__ import annotations

import torch


def rms_norm_composed(x, weight, eps: float = 1e-6):
    """RMSNorm as a plain composition (the float64 oracle in tests)."""
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gated_rms_norm_composed(x, weight, gate_weight, eps: float = 1e-6):
    """Gated RMSNorm as a plain composition (the float64 oracle in tests)."""
    return rms_norm_composed(x, weight, eps) * torch.sigmoid(gate_weight * x)


def _compute(t):
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sum_rows(t):
    return t.reshape(-1, t.shape[-1]).sum(0)


class RMSNormFunction(torch.autograd.Function):
    """``w * x / rms(x) [* sigmoid(u * x)]``; ``gate_weight`` None for plain RMSNorm."""

    @staticmethod
    def forward(ctx, x, weight, gate_weight, eps: float):
        xc = _compute(x)
        n = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
        y = n.mul_(_compute(weight))
        if gate_weight is not None:
            y.mul_(torch.sigmoid(xc * _compute(gate_weight)))
        ctx.eps = eps
        ctx.save_for_backward(x, weight, gate_weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate_weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            with torch.enable_grad():
                if gate_weight is None:
                    y = rms_norm_composed(x, weight, ctx.eps)
                else:
                    y = gated_rms_norm_composed(x, weight, gate_weight, ctx.eps)
                wrt = [(i, t) for i, t in enumerate((x, weight, gate_weight)) if t is not None
                       and ctx.needs_input_grad[i]]
                grads = torch.autograd.grad(y, [t for _, t in wrt], dy, create_graph=True)
            out = [None] * 4
            for (i, _), g in zip(wrt, grads):
                out[i] = g
            return tuple(out)
        xc, w, dyc = _compute(x), _compute(weight), _compute(dy)
        r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + ctx.eps)
        n = xc * r
        gn = dyc * w  # gradient reaching n, before the gate
        dgate = None
        if gate_weight is not None:
            u = _compute(gate_weight)
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
