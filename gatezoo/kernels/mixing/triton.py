"""Fused Triton kernels for token mixing (see :mod:`.naive` for the math).

Forward: one program per (channel block, batch element) loads the (N, BLOCK_C) slab of x once,
and for each block of hidden units computes ``A = W1 x + b1`` and ``H = GELU(A)`` and adds
``W2 H`` to the output in registers; the bias, the residual and the gate are applied in the
epilogue. Neither A, H nor any transpose reaches memory, whatever the hidden size.

Backward: one program per (channel block, batch slice) walks its batch elements, recomputes A
and H from x, and writes dx (and the residual and gate gradients) directly; the weight and bias
gradients build up in a per-program float32 partial (each program owns its rows, so there are no
atomics and the result is deterministic), summed by one reduction afterwards.

Products use the tensor cores: float16/bfloat16 directly, float32 as TF32. Under the CPU
interpreter every product is exact float32. Second-order gradients differentiate
:func:`~.naive.token_mixing_defined` instead. GELU and its slope take the values
docs/activation.md defines at +-inf and NaN (:func:`_pin`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import composed_grads, interpret_mode, on_device
from ..kernel_specs import KernelSpec, register
from .naive import token_mixing_defined
from .torch_path import composed_args

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _pin(a, x, at_pos, at_neg):
    """x, with at_pos where a is +inf, at_neg where a is -inf and NaN where a is NaN (the
    activation op's kernels pin the same way; this op imports nothing from another op)."""
    return tl.where(a == float("inf"), at_pos, tl.where(a == -float("inf"), at_neg, tl.where(a != a, a, x)))


@triton.jit
def _tile(base, offs_r, offs_c, sr, sc, R, C, F32: tl.constexpr):
    """Zero-padded (rows, cols) tile of an R x C matrix with strides (sr, sc)."""
    t = tl.load(base + offs_r.to(tl.int64)[:, None] * sr + offs_c.to(tl.int64)[None, :] * sc,
                mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    if F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _hidden(w1, x, B1, offs_h, HD, HAS_B1: tl.constexpr, IEEE: tl.constexpr):
    """(A, GELU(A)) of one block of hidden units; A is 0 in the padding rows beyond HD (there the
    zero rows of W1 would give 0 * inf = NaN against an infinite x, and W2's zero columns would
    carry that NaN into every output)."""
    a = tl.dot(w1, x, input_precision="ieee" if IEEE else "tf32")
    if HAS_B1:
        a += tl.load(B1 + offs_h, mask=offs_h < HD, other=0.0).to(tl.float32)[:, None]
    a = tl.where((offs_h < HD)[:, None], a, 0.0)
    neg_zero = -tl.full((), 0.0, tl.float32)  # GELU(-inf) = -0 (Triton turns a literal -0.0 into +0)
    return a, _pin(a, a * (0.5 + 0.5 * tl.erf(a * SQRT1_2)), float("inf"), neg_zero)


@triton.jit
def _gelu_slope(a):
    """GELU'(a) = Phi(a) + a phi(a): 1 at +inf, 0 at -inf, NaN at NaN."""
    d = 0.5 + 0.5 * tl.erf(a * SQRT1_2) + a * tl.exp(-0.5 * a * a) * INV_SQRT_2PI
    return _pin(a, d, 1.0, 0.0)


@triton.jit
def _pre_gate(X, W1, B1, W2, B2, R, x, b, offs_n, offs_c,
              srb, srn, src, sw1h, sw1n, sw2n, sw2h, N, HD, C,
              HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_RES: tl.constexpr, F32: tl.constexpr,
              IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """W2 GELU(W1 x + b1) + b2 (+ residual) of one (N, BLOCK_C) slab, float32."""
    y = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, HD, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        w1 = _tile(W1, offs_h, offs_n, sw1h, sw1n, HD, N, F32)
        a, h = _hidden(w1, x, B1, offs_h, HD, HAS_B1, IEEE)
        w2 = _tile(W2, offs_n, offs_h, sw2n, sw2h, N, HD, F32)
        y += tl.dot(w2, h.to(w2.dtype), input_precision="ieee" if IEEE else "tf32")
    if HAS_B2:
        y += tl.load(B2 + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    if HAS_RES:
        y += _tile(R + b.to(tl.int64) * srb, offs_n, offs_c, srn, src, N, C, True)
    return y


@triton.jit
def _token_mixing_fwd_kernel(
    X, W1, B1, W2, B2, R, G, Y,
    sxb, sxn, sxc, srb, srn, src, sgb, sgn, sgc, syb, syn, syc, sw1h, sw1n, sw2n, sw2h,
    N, HD, C,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    F32: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    x = _tile(X + b.to(tl.int64) * sxb, offs_n, offs_c, sxn, sxc, N, C, F32)
    y = _pre_gate(X, W1, B1, W2, B2, R, x, b, offs_n, offs_c, srb, srn, src, sw1h, sw1n, sw2n, sw2h, N, HD, C,
                  HAS_B1, HAS_B2, HAS_RES, F32, IEEE, BLOCK_N, BLOCK_H, BLOCK_C)
    if HAS_GATE:
        y *= _tile(G + b.to(tl.int64) * sgb, offs_n, offs_c, sgn, sgc, N, C, True)
    ok = (offs_n[:, None] < N) & (offs_c[None, :] < C)
    tl.store(Y + b.to(tl.int64) * syb + offs_n.to(tl.int64)[:, None] * syn + offs_c.to(tl.int64)[None, :] * syc,
             y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _add_partial_vec(P, offs, R, val):
    """P[offs] += val on this program's own (R,) float32 partial."""
    tl.store(P + offs, tl.load(P + offs, mask=offs < R, other=0.0) + val, mask=offs < R)


@triton.jit
def _add_partial(P, offs_r, offs_c, R, C, val):
    """P[offs_r, offs_c] += val on this program's own (R, C) float32 partial."""
    ptr = P + offs_r[:, None] * C + offs_c[None, :]
    ok = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    tl.store(ptr, tl.load(ptr, mask=ok, other=0.0) + val, mask=ok)


@triton.jit
def _token_mixing_bwd_kernel(
    X, W1, B1, W2, B2, R, G, DY, DX, DR, DG, DW1P, DB1P, DW2P, DB2P,
    sxb, sxn, sxc, srb, srn, src, sgb, sgn, sgc, sdyb, sdyn, sdyc, sdxb, sdxn, sdxc, sdrb, sdrn, sdrc,
    sdgb, sdgn, sdgc, sw1h, sw1n, sw2n, sw2h,
    BATCH, N, HD, C, SPLIT,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    F32: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    part = (pid_b * tl.num_programs(0) + pid_c).to(tl.int64)  # this program's partial
    dw1p, dw2p = DW1P + part * HD * N, DW2P + part * N * HD
    db1p, db2p = DB1P + part * HD, DB2P + part * N
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (offs_n[:, None] < N) & (offs_c[None, :] < C)
    for bi in range(pid_b, BATCH, SPLIT):
        b = tl.cast(bi, tl.int64)
        x = _tile(X + b.to(tl.int64) * sxb, offs_n, offs_c, sxn, sxc, N, C, F32)
        dy = _tile(DY + b.to(tl.int64) * sdyb, offs_n, offs_c, sdyn, sdyc, N, C, True)
        if HAS_GATE:  # dgate = dy * pre-gate output; the rest sees dy * gate
            pre = _pre_gate(X, W1, B1, W2, B2, R, x, b, offs_n, offs_c, srb, srn, src, sw1h, sw1n, sw2n, sw2h,
                            N, HD, C, HAS_B1, HAS_B2, HAS_RES, F32, IEEE, BLOCK_N, BLOCK_H, BLOCK_C)
            tl.store(DG + b.to(tl.int64) * sdgb + offs_n.to(tl.int64)[:, None] * sdgn
                     + offs_c.to(tl.int64)[None, :] * sdgc, (dy * pre).to(DG.dtype.element_ty), mask=ok)
            dy *= _tile(G + b.to(tl.int64) * sgb, offs_n, offs_c, sgn, sgc, N, C, True)
        if HAS_RES:
            tl.store(DR + b.to(tl.int64) * sdrb + offs_n.to(tl.int64)[:, None] * sdrn
                     + offs_c.to(tl.int64)[None, :] * sdrc, dy.to(DR.dtype.element_ty), mask=ok)
        if HAS_B2:
            _add_partial_vec(db2p, offs_n, N, tl.sum(dy, axis=1))
        dyc = dy.to(x.dtype)
        dx = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for h0 in range(0, HD, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            w1 = _tile(W1, offs_h, offs_n, sw1h, sw1n, HD, N, F32)
            a, h = _hidden(w1, x, B1, offs_h, HD, HAS_B1, IEEE)
            _add_partial(dw2p, offs_n, offs_h, N, HD,
                         tl.dot(dyc, tl.trans(h.to(x.dtype)), input_precision="ieee" if IEEE else "tf32"))
            w2t = _tile(W2, offs_h, offs_n, sw2h, sw2n, HD, N, F32)  # W2^T block, read transposed
            dh = tl.dot(w2t, dyc, input_precision="ieee" if IEEE else "tf32")
            da = dh * _gelu_slope(a)
            dac = da.to(x.dtype)
            _add_partial(dw1p, offs_h, offs_n, HD, N,
                         tl.dot(dac, tl.trans(x), input_precision="ieee" if IEEE else "tf32"))
            if HAS_B1:
                _add_partial_vec(db1p, offs_h, HD, tl.sum(da, axis=1))
            dx += tl.dot(tl.trans(w1), dac, input_precision="ieee" if IEEE else "tf32")
        tl.store(DX + b.to(tl.int64) * sdxb + offs_n.to(tl.int64)[:, None] * sdxn
                 + offs_c.to(tl.int64)[None, :] * sdxc, dx.to(DX.dtype.element_ty), mask=ok)


def _blocks(n: int, hd: int, wide: bool, kernel: str, interpret: bool | None = None):
    """(BLOCK_N, BLOCK_H, BLOCK_C, num_warps) of ``kernel`` ("fwd" or "bwd"): the whole token axis
    as one tile, hidden units and channels in blocks sized so that every variant compiles without
    register spills (``make aot``)."""
    block_n = max(16, triton.next_power_of_2(n))
    if interpret_mode() if interpret is None else interpret:
        return block_n, max(16, min(64, triton.next_power_of_2(hd))), 16, 4
    if kernel == "bwd":  # x, dy, dx and two weight tiles live across the hidden loop
        return block_n, 16, 16, 8
    block_h = 32 if block_n >= 128 or wide else 64
    return block_n, block_h, 32, 4 if block_n <= 64 else 8


def max_tokens(dtype: torch.dtype) -> int:
    """Longest token axis the Triton kernels take for ``dtype`` (the backward keeps the whole
    axis in registers; beyond this it would spill, so longer inputs use the torch path)."""
    return 64 if dtype == torch.float32 else 128


def _flags(x: torch.Tensor) -> dict:
    # The interpreter has no bfloat16 arithmetic, so it multiplies in float32 (F32), and exactly
    # (IEEE). On a GPU float32 inputs use TF32 tensor cores unless PyTorch's float32 matmul
    # precision is "highest" (its default), as for PyTorch's own matmuls.
    interp = interpret_mode()
    exact = torch.get_float32_matmul_precision() == "highest"
    return dict(F32=x.dtype == torch.float32 or interp, IEEE=interp or (x.dtype == torch.float32 and exact))


def _opt(t, like):
    """(tensor, its three strides) or a placeholder that is never read."""
    return (t, *t.stride()) if t is not None else (like, 0, 0, 0)


def token_mixing_forward(x, w1, b1, w2, b2, residual, gate):
    """Launch the forward kernel; returns y (B, N, C) in x's dtype."""
    bsz, n, c = x.shape
    hd = w1.shape[0]
    y = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    bn, bh, bc, warps = _blocks(n, hd, x.dtype == torch.float32, "fwd")
    with on_device(x):
        # batch on grid axis 0 (up to 2^31 - 1 programs; axis 1 allows 65535)
        _token_mixing_fwd_kernel[(bsz, triton.cdiv(c, bc))](
            x, w1, x if b1 is None else b1, w2, x if b2 is None else b2,
            _opt(residual, x)[0], _opt(gate, x)[0], y,
            *x.stride(), *_opt(residual, x)[1:], *_opt(gate, x)[1:], *y.stride(),
            w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), n, hd, c,
            HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_RES=residual is not None, HAS_GATE=gate is not None,
            **_flags(x), BLOCK_N=bn, BLOCK_H=bh, BLOCK_C=bc, num_warps=warps,
        )
    return y


def _split(bsz: int, c_blocks: int, device) -> int:
    """Batch slices of the backward grid: enough programs to fill the GPU, few partials."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(bsz, math.ceil(2 * sms / c_blocks)))


def token_mixing_backward(x, w1, b1, w2, b2, residual, gate, dy):
    """Launch the backward kernel and reduce its partials; returns (dx, dw1, db1, dw2, db2,
    dresidual, dgate), None where the operand is absent (dresidual also when ungated)."""
    bsz, n, c = x.shape
    hd = w1.shape[0]
    bn, bh, bc, warps = _blocks(n, hd, x.dtype == torch.float32, "bwd")
    c_blocks = triton.cdiv(c, bc)
    split = _split(bsz, c_blocks, x.device)
    parts = split * c_blocks
    f32 = dict(dtype=torch.float32, device=x.device)
    dw1p, dw2p = torch.zeros((parts, hd, n), **f32), torch.zeros((parts, n, hd), **f32)
    db1p, db2p = torch.zeros((parts, hd), **f32), torch.zeros((parts, n), **f32)
    dx = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    dres = torch.empty((bsz, n, c), dtype=residual.dtype, device=x.device) if residual is not None else None
    dgate = torch.empty((bsz, n, c), dtype=gate.dtype, device=x.device) if gate is not None else None
    with on_device(x):
        _token_mixing_bwd_kernel[(c_blocks, split)](
            x, w1, x if b1 is None else b1, w2, x if b2 is None else b2,
            _opt(residual, x)[0], _opt(gate, x)[0], dy, dx, _opt(dres, x)[0], _opt(dgate, x)[0],
            dw1p, db1p, dw2p, db2p,
            *x.stride(), *_opt(residual, x)[1:], *_opt(gate, x)[1:], *dy.stride(), *dx.stride(),
            *_opt(dres, x)[1:], *_opt(dgate, x)[1:], w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
            bsz, n, hd, c, split,
            HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_RES=residual is not None, HAS_GATE=gate is not None,
            **_flags(x), BLOCK_N=bn, BLOCK_H=bh, BLOCK_C=bc, num_warps=warps,
        )
    dw1, dw2 = dw1p.sum(0).to(w1.dtype), dw2p.sum(0).to(w2.dtype)
    db1 = db1p.sum(0).to(b1.dtype) if b1 is not None else None
    db2 = db2p.sum(0).to(b2.dtype) if b2 is not None else None
    return dx, dw1, db1, dw2, db2, dres, dgate


class TokenMixingTriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.mixing.torch_path.TokenMixingFunction`; saves
    only its inputs (the residual only when gated) and recomputes the hidden activations in
    backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, gate):
        ctx.has = (b1 is not None, b2 is not None, residual is not None)
        # the backward reads the residual only to rebuild the pre-gate output for the gate's gradient
        ctx.save_for_backward(x, w1, b1, w2, b2, residual if gate is not None else None, gate)
        return token_mixing_forward(x, w1, b1, w2, b2, residual, gate)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            with torch.autocast(dy.device.type, enabled=False):
                return composed_grads(ctx, token_mixing_defined, composed_args(ctx), dy)
        x, w1, b1, w2, b2, residual, gate = ctx.saved_tensors
        dx, dw1, db1, dw2, db2, dres, dgate = token_mixing_backward(x, w1, b1, w2, b2, residual, gate, dy)
        if ctx.has[2] and dres is None:  # no gate: the residual's gradient is dy itself
            dres = dy
        grads = (dx, dw1, db1, dw2, db2, dres, dgate)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _aot_specs():
    """Forward and backward with every optional operand (biases, residual, gate) and a 256-unit
    hidden layer: 49 tokens (MLP-Mixer on 28x28 images, patch 4) in bfloat16, float16 and
    float32 (TF32), and the 128-token limit in bfloat16 and float16."""
    specs = []
    # contiguous operands: channel strides and the weights' inner strides are 1, which Triton
    # specialises at run time as it does here
    strides3 = lambda *names: {f"s{nm}{ax}": "i32" for nm in names for ax in "bn"}
    unit = lambda *names: {f"s{nm}c": 1 for nm in names}
    wstr = dict(sw1h="i32", sw2n="i32")
    for dtype, n in [("bf16", 49), ("fp16", 49), ("fp32", 49), ("bf16", 128), ("fp16", 128)]:
        ptr = f"*{dtype}"
        ops = dict(X=ptr, W1=ptr, B1=ptr, W2=ptr, B2=ptr, R=ptr, G=ptr)
        fwd = dict(**ops, Y=ptr, **strides3("x", "r", "g", "y"), **wstr, N="i32", HD="i32", C="i32")
        bwd = dict(**ops, DY=ptr, DX=ptr, DR=ptr, DG=ptr, DW1P="*fp32", DB1P="*fp32", DW2P="*fp32",
                   DB2P="*fp32", **strides3("x", "r", "g", "dy", "dx", "dr", "dg"), **wstr,
                   BATCH="i32", N="i32", HD="i32", C="i32", SPLIT="i32")
        for kernel, fn, sig, units in (("fwd", _token_mixing_fwd_kernel, fwd, ("x", "r", "g", "y")),
                                       ("bwd", _token_mixing_bwd_kernel, bwd, ("x", "r", "g", "dy", "dx", "dr", "dg"))):
            bn, bh, bc, warps = _blocks(n, 256, dtype == "fp32", kernel, interpret=False)
            consts = dict(HAS_B1=True, HAS_B2=True, HAS_RES=True, HAS_GATE=True, F32=dtype == "fp32", IEEE=False,
                          BLOCK_N=bn, BLOCK_H=bh, BLOCK_C=bc, sw1n=1, sw2h=1, **unit(*units))
            specs.append(KernelSpec(f"token_mixing_{kernel}[N{n},{dtype}]", fn, sig, consts, warps, matmul=True,
                                    unaligned=("BATCH", "N", "HD", "C", "SPLIT")))
    return specs


register(_aot_specs)
