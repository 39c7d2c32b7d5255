"""Fused Triton kernels for the KAN layer (see :mod:`.naive` for the math).

The layer is a matmul whose left operand is computed on the fly. Its (rows, in * basis) basis
matrix is never stored: each program builds a (BLOCK_M, BLOCK_I * NBP) tile of it in registers,
column ``k`` holding basis function ``j = k % NBP`` of input ``i0 + k // NBP`` (NBP is the basis
count padded to a power of two), and feeds it to ``tl.dot`` against the matching tile of the
spline weights viewed as (out, in * basis). A B-spline value is ``N_p(s - j)``, the cardinal
B-spline at the input's grid coordinate ``s = (x - t_0) / h`` shifted by ``j``, from its
truncated-power form (:func:`_cardinal`). RBF bumps are
``exp(-((x - c_j) / h)^2)``. The base branch is a second ``tl.dot`` of ``base(x)`` with ``W_b``.

* forward: a program per (row block, output block) walks the inputs.
* input gradient: a program per (row block, input block) walks the outputs, accumulating
  ``dy @ C`` for its basis columns, then multiplies by the basis derivatives and sums each
  input's NBP columns.
* spline weight gradient: a program per (output block, input block, row slice) accumulates
  ``basis^T @ dy`` over its rows into a float32 partial; the host adds the slices
  (deterministic, no atomics). The base weight's gradient ``dy^T @ base(x)`` is a plain GEMM
  left to the vendor library.

Products use the tensor cores as TF32 for float32 unless PyTorch's float32 matmul precision is
"highest" (then IEEE float32), and exactly under the CPU interpreter; everything computes in
float32. Second-order gradients differentiate :func:`~.naive.kan_linear_composed` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpret_mode, on_device
from ..kernel_specs import KernelSpec, register
from .torch_path import KANSpec, act_and_slope, begin_backward

ACTS = {None: 0, "silu": 1, "elu": 2, "relu": 3}


@triton.jit
def _cardinal(v, ORDER: tl.constexpr, DERIV: tl.constexpr):
    """The cardinal B-spline ``N_p`` (or its derivative) at ``v`` in [0, p + 1), from the
    truncated powers ``N_p(v) = sum_k (-1)^k C(p+1, k) (v - k)_+^p / p!`` taken on the nearer half
    of its symmetric support (``w = min(v, p + 1 - v)``), where the terms stay small."""
    if ORDER == 0:
        out = tl.zeros(v.shape, tl.float32) if DERIV else tl.full(v.shape, 1.0, tl.float32)
    else:
        w = tl.minimum(v, ORDER + 1.0 - v)
        out = tl.zeros(v.shape, tl.float32)
        coef = 1.0
        for k in tl.static_range(ORDER // 2 + 2):
            t = tl.maximum(w - k, 0.0)
            if DERIV:
                term = tl.where(t > 0.0, 1.0, 0.0)
                for _ in tl.static_range(ORDER - 1):
                    term = term * t
            else:
                term = t
                for _ in tl.static_range(ORDER - 1):
                    term = term * t
            out += coef * term
            coef = -coef * (ORDER + 1 - k) / (k + 1)
        fact = 1.0
        for q in tl.static_range(2, ORDER + (0 if DERIV else 1)):
            fact = fact * q
        out = out / fact
        if DERIV:  # N_p(v) = N_p(p + 1 - v): the slope changes sign past the middle
            out = tl.where(v < (ORDER + 1) * 0.5, out, -out)
    return out


@triton.jit
def _basis(x, j, t0, inv_h, NB: tl.constexpr, ORDER: tl.constexpr, BASIS: tl.constexpr, DERIV: tl.constexpr):
    """Basis function ``j`` at ``x`` (or its derivative in x), ``j`` an integer tensor that
    broadcasts against ``x``; 0 for ``j >= NB`` and outside the support (so at +-inf), NaN at NaN."""
    fin = tl.abs(x) < float("inf")
    v = (tl.where(fin, x, 0.0) - t0) * inv_h - j.to(tl.float32)
    if BASIS == 0:  # B_j(x) = N_p(s - j) with s = (x - t_0) / h
        inside = fin & (v >= 0.0) & (v < ORDER + 1.0) & (j < NB)
        out = _cardinal(tl.where(inside, v, 0.0), ORDER, DERIV)
        if DERIV:
            out = out * inv_h
    else:  # exp(-((x - c_j) / h)^2) with c_j = t_0 + j h
        inside = fin & (j < NB)
        out = tl.exp(-v * v)
        if DERIV:
            out = -2.0 * inv_h * v * out
    out = tl.where(inside, out, 0.0)
    if BASIS != 0 or ORDER != 0 or not DERIV:  # the steps of degree 0 have slope 0 everywhere
        out = tl.where(x != x, x, out)
    return out


@triton.jit
def _act(x, ACT: tl.constexpr, DERIV: tl.constexpr):
    """The base activation (1 SiLU, 2 ELU, 3 ReLU) or its slope; SiLU is +inf / -0 at +-inf,
    slopes 1 / 0."""
    fin = tl.abs(x) < float("inf")
    xs = tl.where(fin, x, 0.0)
    if ACT == 1:
        s = tl.sigmoid(xs)
        if DERIV:
            out = tl.where(fin, s * (1.0 + xs * (1.0 - s)), tl.where(x > 0, 1.0, 0.0))
        else:
            out = tl.where(fin, xs * s, tl.where(x > 0, x, -tl.full((), 0.0, tl.float32)))
    elif ACT == 2:
        if DERIV:
            out = tl.where(x > 0, 1.0, tl.exp(tl.minimum(xs, 0.0)))
            out = tl.where(x == float("-inf"), 0.0, out)
        else:
            out = tl.where(x > 0, x, tl.exp(tl.minimum(xs, 0.0)) - 1.0)
            out = tl.where(x == float("-inf"), -1.0, out)
    else:
        if DERIV:
            out = tl.where(x > 0, 1.0, 0.0)
        else:
            out = tl.maximum(x, 0.0)
    return tl.where(x != x, x, out)


@triton.jit
def _kan_fwd_kernel(X, C, WB, BIAS, Y, M, IN, OUT, stride_xm, stride_xi, stride_ym, t0, inv_h,
                    NB: tl.constexpr, NBP: tl.constexpr, ORDER: tl.constexpr, BASIS: tl.constexpr,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_IB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    kk = tl.arange(0, BLOCK_I * NBP)
    il, jj = kk // NBP, kk % NBP
    rmask, omask = rows < M, outs < OUT
    xrow = X + rows.to(tl.int64)[:, None] * stride_xm
    ocol = outs.to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_O), tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        ii = i0 + il
        xk = tl.load(xrow + ii[None, :] * stride_xi, mask=rmask[:, None] & (ii < IN)[None, :], other=0.0)
        b = _basis(xk.to(tl.float32), jj[None, :], t0, inv_h, NB, ORDER, BASIS, False)
        cmask = ((ii < IN) & (jj < NB))[:, None] & omask[None, :]
        c = tl.load(C + ocol * (IN * NB) + (ii * NB + jj)[:, None], mask=cmask, other=0.0).to(tl.float32)
        acc += tl.dot(b, c, input_precision="ieee" if IEEE else "tf32")
    if ACT != 0:
        ib = tl.arange(0, BLOCK_IB)
        for i0 in range(0, IN, BLOCK_IB):
            iib = i0 + ib
            xb = tl.load(xrow + iib[None, :] * stride_xi, mask=rmask[:, None] & (iib < IN)[None, :], other=0.0)
            w = tl.load(WB + ocol * IN + iib[:, None], mask=(iib < IN)[:, None] & omask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.dot(_act(xb.to(tl.float32), ACT, False), w, input_precision="ieee" if IEEE else "tf32")
    if HAS_BIAS:
        acc += tl.load(BIAS + outs, mask=omask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_ym + ocol, acc.to(Y.dtype.element_ty),
             mask=rmask[:, None] & omask[None, :])


@triton.jit
def _kan_dx_kernel(X, C, WB, DY, DX, M, IN, OUT, stride_xm, stride_xi, stride_dym, stride_dxm, t0, inv_h,
                   NB: tl.constexpr, NBP: tl.constexpr, ORDER: tl.constexpr, BASIS: tl.constexpr,
                   ACT: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_I * NBP)
    il, jj = kk // NBP, kk % NBP
    ii = tl.program_id(1) * BLOCK_I + il
    iib = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rows < M
    r64 = rows.to(tl.int64)[:, None]
    ob = tl.arange(0, BLOCK_O)
    g = tl.zeros((BLOCK_M, BLOCK_I * NBP), tl.float32)
    gb = tl.zeros((BLOCK_M, BLOCK_I), tl.float32)
    for o0 in range(0, OUT, BLOCK_O):
        outs = o0 + ob
        omask = outs < OUT
        dy = tl.load(DY + r64 * stride_dym + outs[None, :], mask=rmask[:, None] & omask[None, :],
                     other=0.0).to(tl.float32)
        cmask = omask[:, None] & ((ii < IN) & (jj < NB))[None, :]
        c = tl.load(C + outs.to(tl.int64)[:, None] * (IN * NB) + (ii * NB + jj)[None, :], mask=cmask,
                    other=0.0).to(tl.float32)
        g += tl.dot(dy, c, input_precision="ieee" if IEEE else "tf32")
        if ACT != 0:
            w = tl.load(WB + outs.to(tl.int64)[:, None] * IN + iib[None, :],
                        mask=omask[:, None] & (iib < IN)[None, :], other=0.0).to(tl.float32)
            gb += tl.dot(dy, w, input_precision="ieee" if IEEE else "tf32")
    xk = tl.load(X + r64 * stride_xm + ii[None, :] * stride_xi, mask=rmask[:, None] & (ii < IN)[None, :],
                 other=0.0).to(tl.float32)
    db = _basis(xk, jj[None, :], t0, inv_h, NB, ORDER, BASIS, True)
    dx = tl.sum(tl.reshape(g * db, (BLOCK_M, BLOCK_I, NBP)), axis=2)
    xmask = rmask[:, None] & (iib < IN)[None, :]
    if ACT != 0:
        xb = tl.load(X + r64 * stride_xm + iib[None, :] * stride_xi, mask=xmask, other=0.0).to(tl.float32)
        dx += gb * _act(xb, ACT, True)
    tl.store(DX + r64 * stride_dxm + iib[None, :], dx.to(DX.dtype.element_ty), mask=xmask)


@triton.jit
def _kan_dw_kernel(X, DY, DC, M, IN, OUT, stride_xm, stride_xi, stride_dym, rows_per_slice, t0, inv_h,
                   NB: tl.constexpr, NBP: tl.constexpr, ORDER: tl.constexpr, BASIS: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """The spline weights' gradient, transposed so that the basis columns are the dot's long side:
    ``dC^T[(i, j), o] += basis^T @ dy`` over this program's row slice."""
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    kk = tl.arange(0, BLOCK_I * NBP)
    il, jj = kk // NBP, kk % NBP
    ii = tl.program_id(1) * BLOCK_I + il
    part = tl.program_id(2)
    omask = outs < OUT
    mb = tl.arange(0, BLOCK_M)
    dct = tl.zeros((BLOCK_I * NBP, BLOCK_O), tl.float32)
    start = part * rows_per_slice
    end = tl.minimum(start + rows_per_slice, M)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + mb
        rmask = rows < end
        r64 = rows.to(tl.int64)
        dy = tl.load(DY + r64[:, None] * stride_dym + outs[None, :], mask=rmask[:, None] & omask[None, :],
                     other=0.0).to(tl.float32)
        xt = tl.load(X + r64[None, :] * stride_xm + ii[:, None] * stride_xi,
                     mask=(ii < IN)[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        dct += tl.dot(_basis(xt, jj[:, None], t0, inv_h, NB, ORDER, BASIS, False), dy,
                      input_precision="ieee" if IEEE else "tf32")
    dst = DC + part.to(tl.int64) * OUT * IN * NB + outs.to(tl.int64)[None, :] * (IN * NB) + (ii * NB + jj)[:, None]
    tl.store(dst, dct, mask=((ii < IN) & (jj < NB))[:, None] & omask[None, :])


def _origin(spec: KANSpec) -> float:
    """``t_0``: the first knot (B-splines) or centre (RBF)."""
    return spec.lo - spec.spline_order * spec.cell if spec.basis == "bspline" else spec.lo


# Tiles. The forward's basis tile is BLOCK_M x 64 columns (BLOCK_I = 64 / NBP inputs); the base
# branch walks BLOCK_IB inputs at a time. The gradient kernels own a block of at least 16 inputs
# (the narrowest tl.dot) and its NBP basis columns each; the weight gradient walks rows by 16.
BLOCK_M, BLOCK_O, BLOCK_IB, BLOCK_M_DW, NUM_WARPS, NUM_STAGES = 64, 16, 32, 16, 4, 2


def _dx_warps(fp32: bool) -> int:
    """Warps of the input-gradient kernel: its (BLOCK_M, 16 * NBP) float32 accumulator spills
    over 4 warps on sm_90 for float32 inputs, and the 16-bit variant spills over 8 on sm_80."""
    return 8 if fp32 else 4


def _tiles(nbp: int) -> dict:
    return dict(fwd=max(1, 64 // nbp), grad=max(16, 64 // nbp))


def _flags(spec: KANSpec) -> dict:
    exact = torch.get_float32_matmul_precision() == "highest"
    nb = spec.num_basis
    return dict(NB=nb, NBP=triton.next_power_of_2(nb), ORDER=spec.spline_order if spec.basis == "bspline" else 0,
                BASIS=0 if spec.basis == "bspline" else 1, ACT=ACTS[spec.base_act], IEEE=interpret_mode() or exact)


class KANLinearTriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.kan.torch_path.KANLinearFunction`."""

    @staticmethod
    def forward(ctx, x, spline_weight, base_weight, bias, spec: KANSpec):
        n_in, n_out = x.shape[-1], spline_weight.shape[0]
        x2 = x.reshape(-1, n_in)
        rows = x2.shape[0]
        c = spline_weight.contiguous()
        wb = c if base_weight is None else base_weight.contiguous()
        y = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
        fl = _flags(spec)
        with on_device(x):
            _kan_fwd_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(n_out, BLOCK_O))](
                x2, c, wb, c if bias is None else bias, y, rows, n_in, n_out,
                x2.stride(0), x2.stride(1), y.stride(0), _origin(spec), 1.0 / spec.cell,
                HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_I=_tiles(fl["NBP"])["fwd"],
                BLOCK_IB=BLOCK_IB, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **fl,
            )
        ctx.spec = spec
        ctx.save_for_backward(x, spline_weight, base_weight, bias)
        return y.view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, dy):
        saved, second_order = begin_backward(ctx, dy)
        if second_order is not None:
            return second_order
        x, spline_weight, base_weight, bias, spec, (need_x, need_c, need_b, need_bias) = saved
        n_in, n_out = x.shape[-1], spline_weight.shape[0]
        x2 = x.reshape(-1, n_in)
        dy2 = dy.reshape(-1, n_out)
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        rows = x2.shape[0]
        c = spline_weight.contiguous()
        wb = c if base_weight is None else base_weight.contiguous()
        fl = _flags(spec)
        bi = _tiles(fl["NBP"])["grad"]
        launch = dict(t0=_origin(spec), inv_h=1.0 / spec.cell, BLOCK_O=BLOCK_O, BLOCK_I=bi, num_warps=NUM_WARPS,
                      num_stages=NUM_STAGES, **fl)
        dx = dc = dwb = None
        with on_device(x):
            if need_x:
                dx = torch.empty((rows, n_in), dtype=x.dtype, device=x.device)
                _kan_dx_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(n_in, bi))](
                    x2, c, wb, dy2, dx, rows, n_in, n_out, x2.stride(0), x2.stride(1), dy2.stride(0),
                    dx.stride(0), BLOCK_M=BLOCK_M, **dict(launch, num_warps=_dx_warps(x.dtype == torch.float32)),
                )
            if need_c:
                # row slices: enough programs to fill a GPU, each slice a whole number of row tiles
                tiles = triton.cdiv(n_out, BLOCK_O) * triton.cdiv(n_in, bi)
                row_tiles = max(1, triton.cdiv(rows, BLOCK_M_DW))
                per = triton.cdiv(row_tiles, max(1, min(row_tiles, 256 // tiles))) * BLOCK_M_DW
                slices = max(1, triton.cdiv(rows, per))
                pc = torch.empty((slices, *spline_weight.shape), dtype=torch.float32, device=x.device)
                _kan_dw_kernel[(triton.cdiv(n_out, BLOCK_O), triton.cdiv(n_in, bi), slices)](
                    x2, dy2, pc, rows, n_in, n_out, x2.stride(0), x2.stride(1), dy2.stride(0), per,
                    BLOCK_M=BLOCK_M_DW, **{k: v for k, v in launch.items() if k != "ACT"},
                )
                dc = pc.sum(0).to(spline_weight.dtype)
        if need_b:  # a plain GEMM, dy^T @ base(x): the vendor library's, over a transient base(x)
            dwb = (dy2.t().float() @ act_and_slope(spec.base_act, x2.float(), False)[0]).to(base_weight.dtype)
        dbias = dy2.float().sum(0).to(bias.dtype) if need_bias else None
        return (dx.view(x.shape) if need_x else None), dc, dwb, dbias, None


def _aot_specs():
    """Forward, input gradient and weight gradients for cubic B-splines (G = 5, SiLU base) in
    bfloat16 and float32, and RBF bumps without a base branch in float32."""
    specs = []
    for dtype, basis, act, order, nb in [("bf16", 0, 1, 3, 8), ("fp32", 0, 1, 3, 8), ("fp32", 1, 0, 0, 6)]:
        nbp = triton.next_power_of_2(nb)
        flags = dict(NB=nb, NBP=nbp, ORDER=order, BASIS=basis, ACT=act, IEEE=False, BLOCK_O=BLOCK_O)
        tag = f"[{'bspline3' if basis == 0 else 'rbf'},{'silu' if act else 'nobase'},{dtype}]"
        ptr = f"*{dtype}"
        common = dict(M="i32", IN="i32", OUT="i32", stride_xm="i32", stride_xi="i32")
        loose = ("M", "OUT", "stride_xi", "stride_dym", "t0", "inv_h")
        specs.append(KernelSpec(
            "kan_fwd" + tag, _kan_fwd_kernel,
            dict(X=ptr, C=ptr, WB=ptr, BIAS=ptr, Y=ptr, **common, stride_ym="i32", t0="fp32", inv_h="fp32"),
            dict(flags, HAS_BIAS=True, BLOCK_M=BLOCK_M, BLOCK_I=_tiles(nbp)["fwd"], BLOCK_IB=BLOCK_IB),
            NUM_WARPS, NUM_STAGES, matmul=True, unaligned=loose,
        ))
        specs.append(KernelSpec(
            "kan_dx" + tag, _kan_dx_kernel,
            dict(X=ptr, C=ptr, WB=ptr, DY=ptr, DX=ptr, **common, stride_dym="i32", stride_dxm="i32", t0="fp32",
                 inv_h="fp32"),
            dict(flags, BLOCK_M=BLOCK_M, BLOCK_I=_tiles(nbp)["grad"]), _dx_warps(dtype == "fp32"), NUM_STAGES,
            matmul=True, unaligned=loose,
        ))
        specs.append(KernelSpec(
            "kan_dw" + tag, _kan_dw_kernel,
            dict(X=ptr, DY=ptr, DC="*fp32", **common, stride_dym="i32", rows_per_slice="i32", t0="fp32",
                 inv_h="fp32"),
            dict({k: v for k, v in flags.items() if k != "ACT"}, BLOCK_M=BLOCK_M_DW, BLOCK_I=_tiles(nbp)["grad"]),
            NUM_WARPS, NUM_STAGES, matmul=True, unaligned=loose,
        ))
    return specs


register(_aot_specs)
