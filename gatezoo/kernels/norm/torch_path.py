"""The torch backend of RMSNorm and gated RMSNorm.

:class:`RMSNormFunction` computes in float32 (float64 for float64 inputs), returns x's dtype,
saves its inputs and ``1 / rms`` per row, recomputes the gate in backward, and walks the rows
in cache-sized chunks on the CPU. It must match
:func:`~.naive.rms_norm_composed` and :func:`~.naive.gated_rms_norm_composed`, which also give
its second-order gradients.
"""

from __future__ import annotations

import torch

from ..backend import composed_grads, in_compute_dtype
from ..scratch import Scratch, row_chunks
from .naive import norm_composed

# Elements per chunk on CPU: the handful of chunk-sized temporaries of one chunk stays in cache
# while the backward's dozen elementwise passes run over it.
CPU_CHUNK_ELEMENTS = 1 << 17


def _row_chunks(rows: int, cols: int, device: torch.device):
    """Row slices of about CPU_CHUNK_ELEMENTS elements on CPU, one slice elsewhere."""
    return row_chunks(rows, cols, device, CPU_CHUNK_ELEMENTS)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class RMSNormFunction(torch.autograd.Function):
    """``w * x / rms(x) [* sigmoid(u * x)]``; ``gate_weight`` None for plain RMSNorm. Saves its
    inputs and ``1 / rms`` per row; backward recomputes the gate.

    Both passes walk the rows in chunks of about ``CPU_CHUNK_ELEMENTS`` on the CPU, with every
    temporary in a few chunk-sized scratch buffers, so that the elementwise passes of the formula
    (a dozen in backward) read main memory once."""

    @staticmethod
    def forward(ctx, x, weight, gate_weight, eps: float):
        xr = _rows(x)
        cdt = in_compute_dtype(xr[:0]).dtype
        w = weight.to(cdt)
        u = None if gate_weight is None else gate_weight.to(cdt)
        y = torch.empty(xr.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty((xr.shape[0], 1), dtype=cdt, device=x.device)
        tmp = Scratch(cdt, x.device)
        for sl in _row_chunks(*xr.shape, x.device):
            xc = xr[sl] if xr.dtype == cdt else tmp.like("x", xr[sl]).copy_(xr[sl])
            r = torch.mul(xc, xc, out=tmp.like("n", xc)).mean(-1, keepdim=True).add_(eps).rsqrt_()
            rstd[sl] = r
            out = y[sl] if y.dtype == cdt else tmp.like("y", xc)
            torch.mul(xc, r, out=out).mul_(w)
            if u is not None:
                out.mul_(torch.mul(xc, u, out=tmp.like("s", xc)).sigmoid_())
            if out is not y[sl]:
                y[sl].copy_(out)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, gate_weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate_weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, norm_composed, (x, weight, gate_weight, ctx.eps), dy)
        xr, dyr = _rows(x), _rows(dy)
        cdt = in_compute_dtype(xr[:0]).dtype
        w = weight.to(cdt)
        gated = gate_weight is not None
        u = gate_weight.to(cdt) if gated else None
        dx = torch.empty(xr.shape, dtype=x.dtype, device=x.device)
        dw = torch.zeros(w.shape, dtype=cdt, device=x.device)
        du = torch.zeros(w.shape, dtype=cdt, device=x.device) if gated else None
        tmp = Scratch(cdt, x.device)
        for sl in _row_chunks(*xr.shape, x.device):
            xc = xr[sl] if xr.dtype == cdt else tmp.like("x", xr[sl]).copy_(xr[sl])
            dyc = dyr[sl] if dyr.dtype == cdt else tmp.like("dy", dyr[sl]).copy_(dyr[sl])
            r = rstd[sl]
            n = torch.mul(xc, r, out=tmp.like("n", xc))  # n = x / rms(x)
            t = tmp.like("t", xc)
            if gated:
                s = torch.mul(xc, u, out=tmp.like("s", xc)).sigmoid_()
                a = torch.mul(dyc, n, out=tmp.like("a", xc))  # dy * n
                dw += torch.mul(a, s, out=t).sum(0)
                # dL/d(u x) = w * dy * n * s * (1 - s)
                dg = torch.ops.aten.sigmoid_backward.grad_input(a.mul_(w), s, grad_input=a)
                du += torch.mul(dg, xc, out=t).sum(0)
                gn = torch.mul(dyc, w, out=tmp.like("gn", xc)).mul_(s)  # gradient reaching n
            else:
                dw += torch.mul(dyc, n, out=t).sum(0)
                gn = torch.mul(dyc, w, out=tmp.like("gn", xc))
            dot = torch.mul(gn, n, out=t).mean(-1, keepdim=True)
            out = dx[sl] if dx.dtype == cdt else tmp.like("dx", xc)
            torch.addcmul(gn, n, dot, value=-1.0, out=out).mul_(r)  # r * (gn - n * mean(gn * n))
            if gated:
                out.addcmul_(dg, u)
            if out is not dx[sl]:
                dx[sl].copy_(out)
        return (
            dx.view(x.shape),
            dw.to(weight.dtype),
            None if du is None else du.to(gate_weight.dtype),
            None,
        )
