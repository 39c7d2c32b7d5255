"""Fused Triton kernels for RMSNorm and gated RMSNorm (ReLA-g's output norm).

Each program normalises BLOCK_M whole rows held in registers (the row length is padded to a
power of two and masked). The backward recomputes 1/rms and the gate from x, and writes the
weight gradients as per-program partial sums that the host adds up: deterministic, no atomics.
Second-order gradients differentiate :func:`~.naive.norm_composed` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import composed_grads, on_device
from ..kernel_specs import KernelSpec, register
from .naive import norm_composed


@triton.jit
def _rms_fwd_kernel(X, W, U, Y, R, N, stride_x, stride_y, eps,
                    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * inv[:, None] * w[None, :]
    if GATED:
        u = tl.load(U + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = y * tl.sigmoid(x * u[None, :])
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd_kernel(X, W, U, DY, DX, DW, DU, R, N, stride_x, stride_dy, stride_dx, eps,
                    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    n = x * inv[:, None]
    gn = dy * w[None, :]
    if GATED:
        u = tl.load(U + cols, mask=cols < N, other=0.0).to(tl.float32)
        s = tl.sigmoid(x * u[None, :])
        dgate = gn * n * s * (1.0 - s)  # dL / d(u x)
        gn = gn * s
        tl.store(DW + pid.to(tl.int64) * N + cols, tl.sum(dy * n * s, axis=0), mask=cols < N)
        tl.store(DU + pid.to(tl.int64) * N + cols, tl.sum(dgate * x, axis=0), mask=cols < N)
    else:
        tl.store(DW + pid.to(tl.int64) * N + cols, tl.sum(dy * n, axis=0), mask=cols < N)
    dx = inv[:, None] * (gn - n * (tl.sum(gn * n, axis=1) / N)[:, None])
    if GATED:
        dx = dx + dgate * u[None, :]
    tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def _tiles(rows: int, cols: int):
    block_n = triton.next_power_of_2(max(cols, 1))
    block_m = max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // block_n))
    warps = 4 if block_n * block_m <= 4096 else 8
    return block_m, block_n, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class RMSNormTriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.norm.torch_path.RMSNormFunction`."""

    @staticmethod
    def forward(ctx, x, weight, gate_weight, eps: float):
        x2 = _rows(x)
        w_c = weight.contiguous()  # the kernels read the weights with unit stride
        u_c = None if gate_weight is None else gate_weight.contiguous()
        rows, cols = x2.shape
        y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
        bm, bn, warps = _tiles(rows, cols)
        with on_device(x):
            _rms_fwd_kernel[(triton.cdiv(rows, bm),)](
                x2, w_c, w_c if u_c is None else u_c, y, rows, cols,
                x2.stride(0), y.stride(0), eps, GATED=gate_weight is not None, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=warps,
            )
        ctx.eps = eps
        ctx.save_for_backward(x, weight, gate_weight)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate_weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, norm_composed, (x, weight, gate_weight, ctx.eps), dy)
        x2, dy2 = _rows(x), _rows(dy)
        w_c = weight.contiguous()
        u_c = None if gate_weight is None else gate_weight.contiguous()
        rows, cols = x2.shape
        bm, bn, warps = _tiles(rows, cols)
        programs = triton.cdiv(rows, bm)
        dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
        dw = torch.empty((programs, cols), dtype=torch.float32, device=x.device)
        du = torch.empty((programs, cols), dtype=torch.float32, device=x.device) if gate_weight is not None else dw
        with on_device(x):
            _rms_bwd_kernel[(programs,)](
                x2, w_c, w_c if u_c is None else u_c, dy2, dx, dw, du, rows, cols,
                x2.stride(0), dy2.stride(0), dx.stride(0), ctx.eps,
                GATED=gate_weight is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
            )
        dgate = du.sum(0).to(gate_weight.dtype) if gate_weight is not None else None
        return dx.view(x.shape), dw.sum(0).to(weight.dtype), dgate, None


def _aot_specs():
    """Forward and backward, gated and plain, for a 1024-wide row in bfloat16 and float32."""
    specs = []
    for dtype in ("bf16", "fp32"):
        for gated in (True, False):
            bm, bn, warps = _tiles(1 << 20, 1024)
            ptr = f"*{dtype}"
            consts = dict(GATED=gated, BLOCK_M=bm, BLOCK_N=bn)
            tag = f"[{'gated' if gated else 'plain'},{dtype}]"
            specs.append(KernelSpec(
                "rms_norm_fwd" + tag, _rms_fwd_kernel,
                dict(X=ptr, W=ptr, U=ptr, Y=ptr, R="i32", N="i32", stride_x="i32", stride_y="i32", eps="fp32"),
                consts, warps, unaligned=("R", "eps"),
            ))
            specs.append(KernelSpec(
                "rms_norm_bwd" + tag, _rms_bwd_kernel,
                dict(X=ptr, W=ptr, U=ptr, DY=ptr, DX=ptr, DW="*fp32", DU="*fp32", R="i32", N="i32",
                     stride_x="i32", stride_dy="i32", stride_dx="i32", eps="fp32"),
                consts, warps, unaligned=("R", "eps"),
            ))
    return specs


register(_aot_specs)
