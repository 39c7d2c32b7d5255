"""The torch backend of token mixing (the math is in :mod:`.naive`).

:class:`TokenMixingFunction` is one autograd node that saves its inputs and the pre-activation A
(plus the pre-gate output when gated) and recomputes GELU(A) in backward: one (B, Hd, C) tensor
fewer than autograd of :func:`~.naive.token_mixing_composed` keeps;
:func:`~.naive.token_mixing_defined` gives its second-order gradients. GELU and its backward run
chunk by chunk over A and give the values docs/activation.md defines at +-inf and NaN
(GELU(+inf) = +inf, GELU(-inf) = -0, GELU' = 1 and 0 there) rather than ATen's, which differ
between machines (oneDNN's float32 GELU gives NaN at +inf with AVX-512, +inf with AVX2).
"""

from __future__ import annotations

import math

import torch

from ..backend import composed_grads
from .naive import token_mixing_defined

# Elements of A per GELU chunk on CPU: one sum over each chunk, while it is in cache, finds the
# non-finite pre-activations, where a pass of its own over A would cost a read of A.
CPU_CHUNK_ELEMENTS = 1 << 19


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bmm_bias(w, x, bias, cdt):
    """w @ x (+ bias[:, None]) for batched w (B, R, K) and x (B, K, C)."""
    if bias is None:
        return torch.bmm(w, x)
    return torch.baddbmm(bias.to(cdt)[:, None], w, x)


def _row_chunks(t: torch.Tensor):
    """Row slices of ``t`` viewed as (rows, C): about CPU_CHUNK_ELEMENTS each on CPU, one elsewhere."""
    rows, cols = t.shape
    if t.device.type != "cpu":
        return [slice(None)]
    step = max(1, CPU_CHUNK_ELEMENTS // max(cols, 1))
    return [slice(r, r + step) for r in range(0, rows, step)]


def _nonfinite(t: torch.Tensor) -> bool:
    return not math.isfinite(float(t.sum(dtype=torch.float32)))


def _gelu(a: torch.Tensor) -> torch.Tensor:
    """GELU of the contiguous pre-activation A: +inf at +inf, -0 at -inf, NaN at NaN."""
    ar, h = a.view(-1, a.shape[-1]), torch.empty_like(a)
    hr = h.view(ar.shape)
    for sl in _row_chunks(ar):
        torch.ops.aten.gelu.out(ar[sl], out=hr[sl])
        if _nonfinite(ar[sl]):
            x, y = ar[sl], hr[sl]
            y.masked_fill_(x == math.inf, math.inf).masked_fill_(x == -math.inf, -0.0)
            y.masked_fill_(torch.isnan(x), math.nan)
    return h


def _gelu_backward(dh: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dh * GELU'(A), with GELU' = 1 at +inf and 0 at -inf (products with dh, so an infinite dh
    against the zero slope gives NaN) and NaN at NaN."""
    ar, dhr, da = a.view(-1, a.shape[-1]), dh.view(-1, a.shape[-1]), torch.empty_like(a)
    dar = da.view(ar.shape)
    for sl in _row_chunks(ar):
        torch.ops.aten.gelu_backward.grad_input(dhr[sl], ar[sl], grad_input=dar[sl])
        if _nonfinite(ar[sl]):
            x, g, out = ar[sl], dhr[sl], dar[sl]
            for at, slope in ((math.inf, 1.0), (-math.inf, 0.0)):
                m = x == at
                out[m] = g[m] * slope
            out.masked_fill_(torch.isnan(x), math.nan)
    return da


def _bias_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum of (B, R, C) over batch and columns: (R,)."""
    return t.sum(dim=(0, 2))


class TokenMixingFunction(torch.autograd.Function):
    """Token mixing with a lean backward. Shapes: x (B, N, C); w1 (Hd, N); b1 (Hd,) or None;
    w2 (N, Hd); b2 (N,) or None; residual, gate (B, N, C) or None. Computes in float32 (float64
    for float64 inputs) and returns x's dtype."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, gate):
        cdt = _compute_dtype(x.dtype)
        bsz = x.shape[0]
        xc, w1c, w2c = x.to(cdt), w1.to(cdt), w2.to(cdt)
        # batched products with the weight broadcast over the batch (a stride-0 expand): no
        # transposed copy of x, and the biases and the residual ride in the GEMMs' C operand
        a = _bmm_bias(w1c.expand(bsz, *w1c.shape), xc, b1, cdt)
        h = _gelu(a)
        if residual is not None:
            y = torch.baddbmm(residual.to(cdt), w2c.expand(bsz, *w2c.shape), h)
            if b2 is not None:
                y += b2.to(cdt)[:, None]
        else:
            y = _bmm_bias(w2c.expand(bsz, *w2c.shape), h, b2, cdt)
        del h
        pre = None
        if gate is not None:
            pre = y
            y = pre * gate
        ctx.has = (b1 is not None, b2 is not None, residual is not None)
        # the residual's value matters to the gradients only through the gate
        ctx.save_for_backward(x, w1, b1, w2, b2, residual if gate is not None else None, gate, a, pre)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w1, b1, w2, b2, residual, gate, a, pre = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            with torch.autocast(dy.device.type, enabled=False):
                return composed_grads(ctx, token_mixing_defined, composed_args(ctx), dy)
        with torch.autocast(dy.device.type, enabled=False):
            return _backward(ctx, dy, x, w1, b1, w2, b2, gate, a, pre)


def _backward(ctx, dy, x, w1, b1, w2, b2, gate, a, pre):
    cdt = _compute_dtype(x.dtype)
    dy = dy.to(cdt)
    dgate = None
    if gate is not None:
        dgate = (dy * pre).to(gate.dtype) if ctx.needs_input_grad[6] else None
        dy = dy * gate
    has_b1, has_b2, has_res = ctx.has
    bsz = x.shape[0]
    w1t, w2t = w1.to(cdt).t(), w2.to(cdt).t()
    dw2 = torch.bmm(dy, _gelu(a).transpose(1, 2)).sum(0).to(w2.dtype)  # sum_b dY H^T
    db2 = _bias_grad(dy).to(b2.dtype) if has_b2 else None
    # dA = GELU'(A) * (W2^T dY)
    da = _gelu_backward(torch.bmm(w2t.expand(bsz, *w2t.shape), dy), a)
    dw1 = torch.bmm(da, x.to(cdt).transpose(1, 2)).sum(0).to(w1.dtype)  # sum_b dA x^T
    db1 = _bias_grad(da).to(b1.dtype) if has_b1 else None
    dx = torch.bmm(w1t.expand(bsz, *w1t.shape), da).to(x.dtype)
    dres = dy.to(x.dtype) if has_res else None
    return dx, dw1, db1, dw2, db2, dres, dgate


def composed_args(ctx) -> tuple:
    """The forward's arguments (x, w1, b1, w2, b2, residual, gate) rebuilt from what a token
    mixing autograd function saved (its first seven saved tensors, and ``ctx.has``), for
    :func:`gatezoo.kernels.backend.composed_grads`. A residual is saved only with a gate; without
    one it enters the output linearly, so zeros in its place give the same gradients."""
    x, w1, b1, w2, b2, residual, gate = ctx.saved_tensors[:7]
    if ctx.has[2] and residual is None:
        residual = torch.zeros_like(x, requires_grad=ctx.needs_input_grad[5])
    return x, w1, b1, w2, b2, residual, gate
