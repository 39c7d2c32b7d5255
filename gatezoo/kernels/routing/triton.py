"""Triton kernels for the routing ops (the definitions are in :mod:`.naive`).

* Routing: one program per block of rows holds the rows' (padded) logits in registers, forms
  the selection scores (with a bias on the scores: the row's softmax or the sigmoid of the
  logits, plus the bias) and picks the top k by k rounds of argmax-and-mask (``tl.argmax`` keeps
  the leftmost of equal values, so ties go to the lower expert as in the stable sort of
  :func:`~.naive.route_composed`). It writes the float32 weights (softmax over the selected
  logits, or over their log-sigmoid for sigmoid scores; NaN for a row with a NaN score), the
  int64 indices, and the per-expert counts: each program adds its own histogram of the block
  into an int32 buffer with one atomic add per expert (distinct addresses; integer sums, so the
  counts are exact and deterministic). Scores of -inf are clamped to the lowest finite float32
  for the selection (they rank with it), so a chosen column masked to -inf can never be picked
  twice. The backward is a second small kernel: ``dl_j = scale * w_j (dw_j - sum_i w_i dw_i)``
  at the selected columns (times ``1 - sigmoid(z_j)`` for sigmoid scores), 0 elsewhere.
* Permute: a row gather ``out[i] = x[token[i]]``; its backward and the unpermute forward are one
  gather-reduce kernel over tokens, ``out[n] = sum_j [w[n, j]] src[position[n, j]]`` over the
  kept choices, summed in float32 with no atomics. The unpermute backward runs over tokens too:
  ``dy[position[n, j]] = w[n, j] dout[n]`` (each sorted row has exactly one writer) and
  ``dw[n, j] = <dout[n], y[position[n, j]]>``.
* Grouped GEMM: a tile schedule built on the host with torch ops and no device-to-host sync
  (``searchsorted`` over the per-expert tile counts; a pseudo-expert after the last one covers
  the rows past ``offsets[-1]`` and writes their zeros) gives each program of axis 0 an
  (expert, first row) pair; axis 1 walks the output columns. ``dX = dY W[e]^T`` is the same
  kernel reading W through swapped strides; ``dW[e] = X_e^T dY_e`` has one program per
  (expert, K tile, N tile) looping over the expert's rows (an expert without rows writes zeros).
  float16/bfloat16 multiply on the tensor cores with float32 accumulation; float32 multiplies
  exactly (``input_precision="ieee"``) unless ``torch.set_float32_matmul_precision`` allows TF32,
  as PyTorch's own matmuls do. Under the CPU interpreter every product is exact float32.

Second-order gradients differentiate the compositions of :mod:`.naive`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import composed_grads, interpret_mode, on_device
from ..kernel_specs import KernelSpec, register
from .naive import (
    DispatchPlan,
    Routing,
    grouped_mm_composed,
    permute_composed,
    route_composed,
    sigmoid_factor,
    unpermute_composed,
)

FLT_LOWEST = tl.constexpr(-3.4028234663852886e38)


# --- routing ---------------------------------------------------------------------------------


@triton.jit
def _route_fwd_kernel(L, NOISE, BIAS, W, IDX, COUNTS, R, E, slm, sle, snm, sne, sb, scale,
                      HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ON_SCORES: tl.constexpr,
                      SIGMOID: tl.constexpr, K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    z = tl.load(L + r64 * slm + cols[None, :] * sle, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z += tl.load(NOISE + r64 * snm + cols[None, :] * sne, mask=mask, other=0.0).to(tl.float32)
    z = z * scale
    s = z
    if HAS_BIAS:
        if BIAS_ON_SCORES:
            if SIGMOID:
                t = tl.exp(-tl.abs(z))
                s = tl.where(z >= 0, 1.0 / (1.0 + t), t / (1.0 + t))
            else:
                zm = tl.where(col_ok[None, :], z, float("-inf"))
                t = tl.exp(zm - tl.max(zm, axis=1)[:, None])
                s = t / tl.sum(t, axis=1)[:, None]
        s += tl.load(BIAS + cols * sb, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # a NaN score makes its row's weights NaN; NaN ranks first (as in torch.sort)
    bad = tl.sum(((s != s) & col_ok[None, :]).to(tl.int32), axis=1) > 0
    s = tl.where(col_ok[None, :], tl.where(s != s, float("inf"), tl.maximum(s, FLT_LOWEST)), float("-inf"))
    sel = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
    idx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
    hist = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(s, axis=1)  # the leftmost maximum: ties go to the lower expert
        hit = cols[None, :] == best[:, None]
        zj = tl.sum(tl.where(hit, z, 0.0), axis=1)
        sel = tl.where(kcols[None, :] == j, zj[:, None], sel)
        idx = tl.where(kcols[None, :] == j, best[:, None], idx)
        hist += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
        s = tl.where(hit, float("-inf"), s)
    k_ok = kcols < K
    if SIGMOID:  # log sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)); padded slots (-inf) get weight 0
        sel = tl.minimum(sel, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(sel)))
    p = tl.exp(sel - tl.max(sel, axis=1)[:, None])
    p = tl.where(k_ok[None, :], p, 0.0)
    w = p / tl.sum(p, axis=1)[:, None]
    w = tl.where(bad[:, None], float("nan"), w)
    out_mask = row_ok[:, None] & k_ok[None, :]
    tl.store(W + r64 * K + kcols[None, :], w, mask=out_mask)
    tl.store(IDX + r64 * K + kcols[None, :], idx.to(tl.int64), mask=out_mask)
    tl.atomic_add(COUNTS + cols, hist, mask=col_ok)


@triton.jit
def _route_bwd_kernel(W, IDX, DW, FACTOR, DL, R, E, sdwm, sdwk, sdlm, scale,
                      HAS_FACTOR: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    r64 = rows.to(tl.int64)[:, None]
    kmask = row_ok[:, None] & (kcols < K)[None, :]
    w = tl.load(W + r64 * K + kcols[None, :], mask=kmask, other=0.0)
    dw = tl.load(DW + r64 * sdwm + kcols[None, :] * sdwk, mask=kmask, other=0.0).to(tl.float32)
    idx = tl.load(IDX + r64 * K + kcols[None, :], mask=kmask, other=-1).to(tl.int32)
    g = w * (dw - tl.sum(w * dw, axis=1)[:, None]) * scale
    if HAS_FACTOR:
        g *= tl.load(FACTOR + r64 * K + kcols[None, :], mask=kmask, other=0.0)
    dl = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(K):
        gj = tl.sum(tl.where(kcols[None, :] == j, g, 0.0), axis=1)
        ij = tl.sum(tl.where(kcols[None, :] == j, idx, 0), axis=1)
        dl = tl.where(cols[None, :] == ij[:, None], gj[:, None], dl)
    tl.store(DL + r64 * sdlm + cols[None, :], dl.to(DL.dtype.element_ty), mask=row_ok[:, None] & (cols < E)[None, :])


def _route_blocks(e: int, k: int, interpret: bool | None = None):
    """(BLOCK_M, BLOCK_E, BLOCK_K, num_warps) of the routing kernels: whole (padded) rows of
    logits per program, at most 4096 values."""
    block_e = triton.next_power_of_2(max(e, 1))
    interp = interpret_mode() if interpret is None else interpret
    block_m = max(1, min(16 if interp else 128, 4096 // block_e))
    return block_m, block_e, triton.next_power_of_2(k), 4 if block_m * block_e <= 2048 else 8


class RouteTriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.routing.torch_path.RouteFunction`."""

    @staticmethod
    def forward(ctx, logits, k: int, bias, noise, scale: float, score: str, bias_on: str):
        n, e = logits.shape
        dev = logits.device
        weights = torch.empty((n, k), dtype=torch.float32, device=dev)
        indices = torch.empty((n, k), dtype=torch.int64, device=dev)
        counts = torch.zeros(e, dtype=torch.int32, device=dev)
        bm, be, bk, warps = _route_blocks(e, k)
        nz = noise if noise is not None else logits
        bz = bias if bias is not None else logits
        with on_device(logits):
            _route_fwd_kernel[(triton.cdiv(n, bm),)](
                logits, nz, bz, weights, indices, counts, n, e, logits.stride(0), logits.stride(1),
                nz.stride(0), nz.stride(1), bz.stride(0), scale,
                HAS_NOISE=noise is not None, HAS_BIAS=bias is not None, BIAS_ON_SCORES=bias_on == "scores",
                SIGMOID=score == "sigmoid", K=k, BLOCK_M=bm, BLOCK_E=be, BLOCK_K=bk, num_warps=warps,
            )
        ctx.k, ctx.scale, ctx.score, ctx.bias_on = k, scale, score, bias_on
        ctx.save_for_backward(logits, bias, noise, weights, indices)
        counts = counts.long()
        ctx.mark_non_differentiable(indices, counts)
        return weights, indices, counts

    @staticmethod
    def backward(ctx, dweights, _dindices, _dcounts):
        logits, bias, noise, weights, indices = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            args = (logits, ctx.k, bias, noise, ctx.scale, ctx.score, ctx.bias_on)
            return composed_grads(ctx, _route_weights, args, dweights)
        n, e = logits.shape
        dl = torch.empty((n, e), dtype=logits.dtype, device=logits.device)
        # sigmoid scores: the (N, k) factor 1 - sigmoid(z) of the selected logits, gathered here
        factor = sigmoid_factor(logits, noise, ctx.scale, indices) if ctx.score == "sigmoid" else None
        bm, be, bk, warps = _route_blocks(e, ctx.k)
        with on_device(logits):
            _route_bwd_kernel[(triton.cdiv(n, bm),)](
                weights, indices, dweights, factor if factor is not None else weights, dl, n, e, dweights.stride(0),
                dweights.stride(1), dl.stride(0), ctx.scale, HAS_FACTOR=factor is not None, K=ctx.k,
                BLOCK_M=bm, BLOCK_E=be, BLOCK_K=bk, num_warps=warps,
            )
        dnoise = dl.to(noise.dtype) if noise is not None and ctx.needs_input_grad[3] else None
        return (dl if ctx.needs_input_grad[0] else None), None, None, dnoise, None, None, None


def _route_weights(logits, k, bias, noise, scale, score, bias_on):
    return route_composed(logits, k, bias, noise, scale, score, bias_on).weights


def route_triton(logits, k: int, bias=None, noise=None, scale: float = 1.0, score: str = "softmax",
                 bias_on: str = "scores") -> Routing:
    """:func:`~.naive.route_composed` with the fused routing kernel."""
    return Routing(*RouteTriton.apply(logits, k, bias, noise, scale, score, bias_on))


# --- permute / unpermute ---------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(X, TOKEN, OUT, M, D, sxm, sxd, som,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < D)[None, :]
    tok = tl.load(TOKEN + rows, mask=row_ok, other=0)
    v = tl.load(X + tok[:, None] * sxm + cols[None, :] * sxd, mask=mask)
    tl.store(OUT + rows.to(tl.int64)[:, None] * som + cols[None, :], v, mask=mask)


@triton.jit
def _gather_sum_kernel(SRC, POS, WT, OUT, N, D, K, ssm, ssd, spn, spk, swn, swk, son,
                       WEIGHTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = sum_j [w[n, j]] src[pos[n, j]] over pos >= 0, in float32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    r64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in range(K):
        pos = tl.load(POS + r64 * spn + j * spk, mask=row_ok, other=-1)
        ok = pos >= 0
        v = tl.load(SRC + pos[:, None] * ssm + cols[None, :] * ssd, mask=ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(WT + r64 * swn + j * swk, mask=ok, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    tl.store(OUT + r64[:, None] * son + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _unpermute_bwd_kernel(Y, WT, POS, DOUT, DY, DW, N, D, K, sym, syd, swn, swk, spn, spk, sdon, sdod, sdym,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dy[pos[n, j]] = w[n, j] dout[n] and dw[n, j] = <dout[n], y[pos[n, j]]> (0 when dropped)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    for j in range(K):
        pos = tl.load(POS + r64 * spn + j * spk, mask=row_ok, other=-1)
        ok = pos >= 0
        w = tl.load(WT + r64 * swn + j * swk, mask=ok, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            do = tl.load(DOUT + r64[:, None] * sdon + cols[None, :] * sdod, mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0).to(tl.float32)
            m = ok[:, None] & col_ok[None, :]
            y = tl.load(Y + pos[:, None] * sym + cols[None, :] * syd, mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(do * y, axis=1)
            tl.store(DY + pos[:, None] * sdym + cols[None, :], (w[:, None] * do).to(DY.dtype.element_ty), mask=m)
        tl.store(DW + r64 * K + j, dot.to(DW.dtype.element_ty), mask=row_ok)


def _row_blocks(d: int, interpret: bool | None = None):
    """(BLOCK_R, BLOCK_D, num_warps) of the gather kernels: up to 1024 columns and 2048 values
    per program, 4 warps (with 8 warps ptxas caps the weighted gather at 64 registers and spills)."""
    if interpret_mode() if interpret is None else interpret:
        return 16, max(16, min(64, triton.next_power_of_2(max(d, 1)))), 4
    block_d = max(16, min(1024, triton.next_power_of_2(max(d, 1))))
    return max(1, 2048 // block_d), block_d, 4


def _gather_sum(src, pos, weights, out_rows: int, dtype):
    d = src.shape[1]
    out = torch.empty((out_rows, d), dtype=dtype, device=src.device)
    br, bd, warps = _row_blocks(d)
    wt = weights if weights is not None else src
    wstr = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    with on_device(src):
        _gather_sum_kernel[(triton.cdiv(out_rows, br), triton.cdiv(d, bd))](
            src, pos, wt, out, out_rows, d, pos.shape[1], src.stride(0), src.stride(1),
            pos.stride(0), pos.stride(1), *wstr, out.stride(0),
            WEIGHTED=weights is not None, BLOCK_R=br, BLOCK_D=bd, num_warps=warps,
        )
    return out


class PermuteTriton(torch.autograd.Function):
    """``x[plan.token]``; backward gathers and sums each token's rows by ``plan.position``."""

    @staticmethod
    def forward(ctx, x, plan: DispatchPlan):
        m, d = plan.token.shape[0], x.shape[1]
        out = torch.empty((m, d), dtype=x.dtype, device=x.device)
        br, bd, warps = _row_blocks(d)
        with on_device(x):
            _gather_rows_kernel[(triton.cdiv(m, br), triton.cdiv(d, bd))](
                x, plan.token.contiguous(), out, m, d, x.stride(0), x.stride(1), out.stride(0),
                BLOCK_R=br, BLOCK_D=bd, num_warps=warps,
            )
        ctx.plan = plan
        ctx.save_for_backward(x)  # read only by a second-order backward, which rebuilds the graph
        return out

    @staticmethod
    def backward(ctx, dxs):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, permute_composed, (ctx.saved_tensors[0], ctx.plan), dxs)
        (x,) = ctx.saved_tensors
        return _gather_sum(dxs, ctx.plan.position, None, x.shape[0], x.dtype), None


def permute_triton(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """:func:`~.naive.permute_composed` with the gather kernel."""
    return PermuteTriton.apply(x, plan)


class UnpermuteTriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.routing.torch_path.UnpermuteFunction`."""

    @staticmethod
    def forward(ctx, y, weights, plan: DispatchPlan):
        ctx.plan = plan
        ctx.save_for_backward(y, weights)
        return _gather_sum(y, plan.position, weights, plan.position.shape[0], y.dtype)

    @staticmethod
    def backward(ctx, dout):
        y, weights = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, unpermute_composed, (y, weights, plan), dout)
        n, k = plan.position.shape
        d = y.shape[1]
        dy = torch.empty((y.shape[0], d), dtype=y.dtype, device=y.device)
        dw = torch.empty((n, k), dtype=weights.dtype, device=y.device)
        br, bd, warps = _row_blocks(d)
        br = max(1, min(br, 64))  # the rows' dot products are reduced across BLOCK_D in registers
        pos = plan.position
        with on_device(y):
            _unpermute_bwd_kernel[(triton.cdiv(n, br),)](
                y, weights, pos, dout, dy, dw, n, d, k, y.stride(0), y.stride(1), weights.stride(0),
                weights.stride(1), pos.stride(0), pos.stride(1), dout.stride(0), dout.stride(1), dy.stride(0),
                BLOCK_R=br, BLOCK_D=bd, num_warps=4,
            )
        return (dy if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


def unpermute_triton(y: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """:func:`~.naive.unpermute_composed` with the gather-reduce kernels."""
    if y.shape[0] == 0:  # every assignment dropped: nothing to gather
        from .torch_path import unpermute_torch

        return unpermute_torch(y, weights, plan)
    return UnpermuteTriton.apply(y, weights, plan)


# --- grouped GEMM ----------------------------------------------------------------------------


@triton.jit
def _gmm_kernel(A, B, OUT, BOUNDS, TILE_E, TILE_ROW, E, K, N,
                sam, sak, sbe, sbk, sbn, som,
                F32: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows of e] = a[rows of e] @ b[e] for the (expert, first row) tile of this program;
    group E (past the last expert) writes zeros."""
    pid = tl.program_id(0)
    e = tl.load(TILE_E + pid)
    row0 = tl.load(TILE_ROW + pid)
    row_end = tl.load(BOUNDS + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    kk = tl.arange(0, BLOCK_K)
    b_base = B + e.to(tl.int64) * sbe
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_stop = tl.where((e < E) & (row0 < row_end), K, 0)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + kk
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * sam + ks[None, :] * sak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * sbk + cols[None, :] * sbn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision="ieee" if IEEE else "tf32")
    tl.store(OUT + rows[:, None] * som + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gmm_dw_kernel(X, DY, DW, BOUNDS, K, N, sxm, sxk, sdym, sdyn, sdwe, sdwk,
                   F32: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[e] tile (K tile, N tile) = x[rows of e]^T @ dy[rows of e]."""
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    n_ok = ns < N
    lo = tl.load(BOUNDS + e)
    hi = tl.load(BOUNDS + e + 1)
    mm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + mm
        row_ok = rows < hi
        x = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dy = tl.load(DY + rows[:, None] * sdym + ns[None, :] * sdyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if F32:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        acc += tl.dot(tl.trans(x), dy, input_precision="ieee" if IEEE else "tf32")
    tl.store(DW + e.to(tl.int64) * sdwe + ks[:, None] * sdwk + ns[None, :], acc.to(DW.dtype.element_ty),
             mask=k_ok[:, None] & n_ok[None, :])


def _gmm_flags(x: torch.Tensor) -> dict:
    # The interpreter has no bfloat16/float16 arithmetic, so it multiplies in float32 (F32), and
    # exactly (IEEE). On a GPU float32 is exact unless PyTorch's float32 matmul precision allows
    # TF32 (its default "highest" does not), as for torch.mm.
    interp = interpret_mode()
    exact = torch.get_float32_matmul_precision() == "highest"
    return dict(F32=x.dtype == torch.float32 or interp, IEEE=interp or (x.dtype == torch.float32 and exact))


def _gmm_blocks(kernel: str, dtype: torch.dtype, ieee: bool, interpret: bool | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of ``kernel`` ("mm" or "dw"); chosen so
    that every variant compiles without spills and, for 16-bit and TF32 operands, with a 64-row
    tensor-core tile (``python -m gatezoo.kernels.aot``)."""
    if interpret_mode() if interpret is None else interpret:
        return 16, 16, 16, 4, 1
    if dtype == torch.float32 and ieee:  # CUDA-core FMAs
        return 32, 64, 32, 4, 2
    if dtype == torch.float32:  # TF32
        return (64, 64, 32, 4, 3) if kernel == "mm" else (32, 64, 64, 4, 3)
    return (64, 128, 64, 4, 3) if kernel == "mm" else (64, 128, 64, 4, 3)


def tile_schedule(offsets: torch.Tensor, rows: int, block_m: int):
    """(bounds, tile expert, tile first row) for :func:`_gmm_kernel`, built without a host sync.

    ``bounds`` is ``offsets`` with ``rows`` appended: group E, after the last expert, holds the
    rows past ``offsets[-1]``. Group g has ``ceil(size_g / block_m)`` tiles; tile t belongs to the
    group whose cumulative tile count first exceeds t. The grid is the upper bound
    ``ceil(rows / block_m) + E + 1`` on the tile count; the surplus tiles get group E with a first
    row at its end, so they do nothing.
    """
    dev = offsets.device
    bounds = torch.cat([offsets, torch.full((1,), rows, dtype=offsets.dtype, device=dev)])
    groups = bounds.numel() - 1
    sizes = bounds.diff()
    tiles = (sizes + block_m - 1) // block_m
    ends = tiles.cumsum(0)
    total = triton.cdiv(rows, block_m) + groups
    t = torch.arange(total, device=dev)
    g = torch.searchsorted(ends, t, right=True)
    spare = g >= groups
    g = g.clamp(max=groups - 1)
    row0 = bounds[g] + (t - (ends[g] - tiles[g])) * block_m
    row0 = torch.where(spare, bounds[-1], row0)
    return bounds.contiguous(), g.to(torch.int32).contiguous(), row0.contiguous(), total


def _gmm(a, b, b_strides, num_experts, offsets, k_dim, n_dim):
    """out (M, n_dim) = grouped product of a (M, k_dim) with b[e] (k_dim, n_dim) read through
    ``b_strides`` (expert, k, n); rows past offsets[-1] are zero."""
    m = a.shape[0]
    out = torch.empty((m, n_dim), dtype=a.dtype, device=a.device)
    flags = _gmm_flags(a)
    bm, bn, bk, warps, stages = _gmm_blocks("mm", a.dtype, flags["IEEE"])
    bounds, tile_e, tile_row, total = tile_schedule(offsets, m, bm)
    with on_device(a):
        _gmm_kernel[(total, triton.cdiv(n_dim, bn))](
            a, b, out, bounds, tile_e, tile_row, num_experts, k_dim, n_dim,
            a.stride(0), a.stride(1), b_strides[0], b_strides[1], b_strides[2], out.stride(0),
            **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
    return out


def _gmm_dw(x, dy, offsets, weight_shape, dtype):
    e, k_dim, n_dim = weight_shape
    dw = torch.empty(weight_shape, dtype=dtype, device=x.device)
    flags = _gmm_flags(x)
    bm, bn, bk, warps, stages = _gmm_blocks("dw", x.dtype, flags["IEEE"])
    with on_device(x):
        _gmm_dw_kernel[(e, triton.cdiv(k_dim, bk), triton.cdiv(n_dim, bn))](
            x, dy, dw, offsets, k_dim, n_dim, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dw.stride(0), dw.stride(1),
            **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
    return dw


class GroupedMMTriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.routing.torch_path.GroupedMMFunction`."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        e, k_dim, n_dim = weight.shape
        return _gmm(x, weight, weight.stride(), e, offsets, k_dim, n_dim)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offsets = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, grouped_mm_composed, (x, weight, offsets), dy)
        e, k_dim, n_dim = weight.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dy @ w[e]^T: w read as (E, N, K) through swapped strides
            sw = weight.stride()
            dx = _gmm(dy, weight, (sw[0], sw[2], sw[1]), e, offsets, n_dim, k_dim)
        if ctx.needs_input_grad[1]:
            dw = _gmm_dw(x, dy, offsets.contiguous(), tuple(weight.shape), weight.dtype)
        return dx, dw, None


def grouped_mm_triton(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`~.naive.grouped_mm_composed` with the grouped GEMM kernels."""
    if weight.shape[0] == 0:  # no experts: every row is past offsets[-1]
        from .torch_path import grouped_mm_torch

        return grouped_mm_torch(x, weight, offsets)
    return GroupedMMTriton.apply(x, weight, offsets)


# --- compile variants ------------------------------------------------------------------------


def _aot_specs():
    """Routing for 8 experts (k=2) and 64 experts (k=8) in float32 and bfloat16 logits; the gathers
    for a 1024-wide row in bfloat16 and float32; the grouped GEMM forward (also dX) and dW with
    contiguous operands in bfloat16, float16, float32 on TF32 tensor cores (all matmul variants)
    and exact float32 (CUDA cores)."""
    specs = []
    # the softmax-score routing with its bias on the scores (the default) for both sizes and
    # dtypes; sigmoid scores and the bias on the logits for the larger size in float32
    variants = [(e, k, dtype, "softmax", "scores") for e, k in ((8, 2), (64, 8)) for dtype in ("fp32", "bf16")]
    variants += [(64, 8, "fp32", "sigmoid", "scores"), (64, 8, "fp32", "softmax", "logits")]
    for e, k, dtype, score, bias_on in variants:
        bm, be, bk, warps = _route_blocks(e, k, interpret=False)
        ptr = f"*{dtype}"
        extra = "" if (score, bias_on) == ("softmax", "scores") else f",{score},bias_on_{bias_on}"
        tag = f"[E{e},k{k},{dtype}{extra}]"
        specs.append(KernelSpec(
            "route_fwd" + tag, _route_fwd_kernel,
            dict(L=ptr, NOISE=ptr, BIAS="*fp32", W="*fp32", IDX="*i64", COUNTS="*i32", R="i32", E="i32",
                 slm="i32", snm="i32", sb="i32", scale="fp32"),
            dict(HAS_NOISE=True, HAS_BIAS=True, BIAS_ON_SCORES=bias_on == "scores", SIGMOID=score == "sigmoid",
                 K=k, BLOCK_M=bm, BLOCK_E=be, BLOCK_K=bk, sle=1, sne=1),
            warps, unaligned=("R", "E", "scale", "sb"),
        ))
        if bias_on != "scores":  # the backward does not depend on where the bias went
            continue
        specs.append(KernelSpec(
            "route_bwd" + tag, _route_bwd_kernel,
            dict(W="*fp32", IDX="*i64", DW="*fp32", FACTOR="*fp32", DL=ptr, R="i32", E="i32", sdwm="i32",
                 sdlm="i32", scale="fp32"),
            dict(HAS_FACTOR=score == "sigmoid", K=k, BLOCK_M=bm, BLOCK_E=be, BLOCK_K=bk, sdwk=1),
            warps, unaligned=("R", "E", "scale", "sdwm", "sdlm"),
        ))
    for d, dtype in ((1024, "bf16"), (1024, "fp32"), (128, "bf16")):
        ptr = f"*{dtype}"
        br, bd, warps = _row_blocks(d, interpret=False)
        tag = f"[D{d},{dtype}]"
        specs.append(KernelSpec(
            "permute_gather" + tag, _gather_rows_kernel,
            dict(X=ptr, TOKEN="*i64", OUT=ptr, M="i32", D="i32", sxm="i32", som="i32"),
            dict(BLOCK_R=br, BLOCK_D=bd, sxd=1), warps, unaligned=("M",),
        ))
        for weighted, name in ((True, "unpermute_fwd"), (False, "permute_bwd")):
            specs.append(KernelSpec(
                name + tag, _gather_sum_kernel,
                dict(SRC=ptr, POS="*i64", WT="*fp32", OUT=ptr, N="i32", D="i32", K="i32", ssm="i32", spn="i32",
                     swn="i32", son="i32"),
                dict(WEIGHTED=weighted, BLOCK_R=br, BLOCK_D=bd, ssd=1, spk=1, swk=1), warps,
                unaligned=("N", "K", "spn", "swn"),
            ))
        specs.append(KernelSpec(
            "unpermute_bwd" + tag, _unpermute_bwd_kernel,
            dict(Y=ptr, WT="*fp32", POS="*i64", DOUT=ptr, DY=ptr, DW="*fp32", N="i32", D="i32", K="i32",
                 sym="i32", swn="i32", spn="i32", sdon="i32", sdym="i32"),
            dict(BLOCK_R=min(br, 64), BLOCK_D=bd, syd=1, swk=1, spk=1, sdod=1), 4,
            unaligned=("N", "K", "swn", "spn"),
        ))
    variants = [("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                ("tf32", torch.float32, False), ("fp32", torch.float32, True)]
    for tag, dtype, ieee in variants:
        ptr = "*fp32" if dtype == torch.float32 else f"*{tag}"
        label = f"{tag},fp32" if tag == "tf32" else tag
        mm = dict(A=ptr, B=ptr, OUT=ptr, BOUNDS="*i64", TILE_E="*i32", TILE_ROW="*i64", E="i32", K="i32", N="i32",
                  sam="i32", sbe="i32", som="i32")
        flags = dict(F32=dtype == torch.float32, IEEE=ieee)
        bm, bn, bk, warps, stages = _gmm_blocks("mm", dtype, ieee, interpret=False)
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        # forward: x (M, K) and w[e] (K, N) row-major; dX: dy (M, N) and w[e]^T read column-major
        specs.append(KernelSpec(f"grouped_mm_fwd[{label}]", _gmm_kernel, {**mm, "sbk": "i32"},
                                dict(**flags, **blocks, sak=1, sbn=1), warps, stages, matmul=not ieee,
                                unaligned=("E",)))
        specs.append(KernelSpec(f"grouped_mm_dx[{label}]", _gmm_kernel, {**mm, "sbn": "i32"},
                                dict(**flags, **blocks, sak=1, sbk=1), warps, stages, matmul=not ieee,
                                unaligned=("E",)))
        bm, bn, bk, warps, stages = _gmm_blocks("dw", dtype, ieee, interpret=False)
        specs.append(KernelSpec(
            f"grouped_mm_dw[{label}]", _gmm_dw_kernel,
            dict(X=ptr, DY=ptr, DW=ptr, BOUNDS="*i64", K="i32", N="i32", sxm="i32", sdym="i32", sdwe="i32",
                 sdwk="i32"),
            dict(**flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, sxk=1, sdyn=1), warps, stages, matmul=not ieee,
            unaligned=(),
        ))
    return specs


register(_aot_specs)
