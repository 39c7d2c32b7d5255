"""Fused Triton kernels for the gated-activation / GLU family.

One forward and one backward kernel cover the whole table: the gate, the order, the second
operand (GLU) and the trainable ``alpha`` are compile-time flags, so each variant is a
straight-line elementwise kernel. Inputs are (R, N) row views with unit column stride (the
halves of a packed GLU input are read in place through the row stride); all math is float32.
The backward recomputes the gate from the inputs and reduces ``dalpha`` per program into a
buffer that is summed on the host, so gradients are deterministic (no atomics). Second-order
gradients differentiate the plain composition (:func:`~.packing.composed_rows`) instead.

At +-inf and NaN the kernels write the values of :func:`~.kinds.limits` (:func:`_limits`,
:func:`_pin`) instead of evaluating the formula there, where it would meet inf * 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import composed_grads, on_device
from ..kernel_specs import KernelSpec, register
from .kinds import IDENTITY, KINDS, RELU, ActKind
from .packing import composed_rows, grad_buffers, input_grads, unpack

INV_PI = tl.constexpr(0.3183098861837907)
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# Elements per program: enough work per program to hide memory latency on a GPU; with 8 warps
# the forward holds 16 elements per thread and operand (four 128-bit loads of float32), the
# backward, which keeps three inputs and several gate terms live, 8 so that it never spills.
TILE_FWD = 4096
TILE_BWD = 2048
NUM_WARPS = 8


@triton.jit
def _atan(x):
    # libdevice.atan is not available in the CPU interpreter, so use a Cephes-style
    # reduction to |t| <= tan(pi/8) and an odd polynomial (float32 accurate).
    ax = tl.abs(x)
    big = ax > 2.414213562373095
    mid = ax > 0.4142135623730950
    t = tl.where(big, -1.0 / tl.maximum(ax, 1e-30), tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
    base = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    z = t * t
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
    r = base + p
    return tl.where(x < 0, -r, r)


@triton.jit
def _gate(a, GATE: tl.constexpr):
    if GATE == 0:
        g = tl.sigmoid(a)
    elif GATE == 1:
        g = _atan(a) * INV_PI + 0.5
    else:
        g = 0.5 + 0.5 * tl.erf(a * SQRT1_2)
    return g


@triton.jit
def _gate_slope(a, g, GATE: tl.constexpr):
    if GATE == 0:
        s = g * (1.0 - g)
    elif GATE == 1:
        s = INV_PI / (1.0 + a * a)
    else:
        s = tl.exp(-0.5 * a * a) * INV_SQRT_2PI
    return s


@triton.jit
def _pin(a, x, at_pos, at_neg):
    """x, with at_pos where a is +inf, at_neg where a is -inf and NaN where a is NaN."""
    return tl.where(a == float("inf"), at_pos, tl.where(a == -float("inf"), at_neg, tl.where(a != a, a, x)))


@triton.jit
def _limits(al, GATE: tl.constexpr, ORDER: tl.constexpr, HAS_ALPHA: tl.constexpr):
    """(phi, phi', dphi/dalpha) at +inf and at -inf, in the order of kinds.Limits: the limits
    derived in kinds.py, for the expansion ``al`` (a float32 scalar; unused without alpha)."""
    if GATE == 1:
        c_pos = INV_PI
        c_neg = -INV_PI
    else:
        c_pos = 0.0
        c_neg = -tl.full((), 0.0, tl.float32)  # -0: Triton turns a literal -0.0 into +0
    if ORDER == 1:
        if HAS_ALPHA:
            s = 1.0 + 2.0 * al
            phi_pos = s * 1.0 - al
            phi_neg = s * 0.0 - al
        else:
            phi_pos = 1.0
            phi_neg = 0.0
        return phi_pos, phi_neg, 0.0, 0.0, 1.0, -1.0
    else:
        if HAS_ALPHA:
            ok = tl.abs(al) < float("inf")  # a non-finite alpha makes everything NaN
            phi_pos = tl.where(1.0 + al > 0.0, float("inf"), tl.where(1.0 + al < 0.0, -float("inf"), c_pos))
            phi_neg = tl.where(al > 0.0, float("inf"), tl.where(al < 0.0, -float("inf"), c_neg))
            phi_pos = tl.where(ok, phi_pos, float("nan"))
            phi_neg = tl.where(ok, phi_neg, float("nan"))
            slope_pos = tl.where(ok, 1.0 + al, float("nan"))
            slope_neg = tl.where(ok, 0.0 - al, float("nan"))
        else:
            phi_pos = float("inf")
            phi_neg = c_neg
            slope_pos = 1.0
            slope_neg = 0.0
        return phi_pos, phi_neg, slope_pos, slope_neg, float("inf"), float("inf")


@triton.jit
def _glu_fwd_kernel(
    A, B, Y, ALPHA,
    R, N, stride_a, stride_b, stride_y,
    GATE: tl.constexpr, ORDER: tl.constexpr, HAS_B: tl.constexpr, HAS_ALPHA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one flat grid axis (axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65535)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    rows = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    a = tl.load(A + r * stride_a + c, mask=mask, other=0.0).to(tl.float32)
    if GATE == 3:
        phi = a
    elif GATE == 4:
        phi = _pin(a, tl.where(a < 0.0, 0.0, a), float("inf"), 0.0)  # relu keeping NaN
    else:
        g = _gate(a, GATE)
        if HAS_ALPHA:
            al = tl.load(ALPHA).to(tl.float32)
            g = (1.0 + 2.0 * al) * g - al
        else:
            al = 0.0
        if ORDER == 2:
            phi = a * g
        else:
            phi = g
        phi_pos, phi_neg, _, _, _, _ = _limits(al, GATE, ORDER, HAS_ALPHA)
        phi = _pin(a, phi, phi_pos, phi_neg)
    if HAS_B:
        phi = phi * tl.load(B + r * stride_b + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + r * stride_y + c, phi.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    A, B, DY, DA, DB, ALPHA, DALPHA,
    R, N, stride_a, stride_b, stride_dy, stride_da, stride_db,
    GATE: tl.constexpr, ORDER: tl.constexpr, HAS_B: tl.constexpr, HAS_ALPHA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    rows = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    a = tl.load(A + r * stride_a + c, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        w = dy * tl.load(B + r * stride_b + c, mask=mask, other=0.0).to(tl.float32)
    else:
        w = dy
    if GATE == 3:
        phi = a
        da = w
    elif GATE == 4:
        phi = _pin(a, tl.where(a < 0.0, 0.0, a), float("inf"), 0.0)  # relu keeping NaN
        # w * step(a): a product, so an infinite or NaN w at a <= 0 gives NaN (docs/activation.md)
        da = w * _pin(a, tl.where(a > 0.0, 1.0, 0.0), 1.0, 0.0)
    else:
        g = _gate(a, GATE)
        slope = _gate_slope(a, g, GATE)
        if HAS_ALPHA:
            al = tl.load(ALPHA).to(tl.float32)
            e = (1.0 + 2.0 * al) * g - al
            slope = (1.0 + 2.0 * al) * slope
        else:
            al = 0.0
            e = g
        phi_pos, phi_neg, slope_pos, slope_neg, t_pos, t_neg = _limits(al, GATE, ORDER, HAS_ALPHA)
        if ORDER == 2:
            phi = a * e
            d = e + a * slope
            t = a * (2.0 * g - 1.0)
        else:
            phi = e
            d = slope
            t = 2.0 * g - 1.0
        phi = _pin(a, phi, phi_pos, phi_neg)
        da = w * _pin(a, d, slope_pos, slope_neg)  # phi' first, then the product with w
        if HAS_ALPHA:
            # masked lanes hold a = dy = 0, so they add nothing
            t = _pin(a, t, t_pos, t_neg)
            tl.store(DALPHA + pid, tl.sum(tl.sum(w * t, axis=1), axis=0))
    tl.store(DA + r * stride_da + c, da.to(DA.dtype.element_ty), mask=mask)
    if HAS_B:
        tl.store(DB + r * stride_db + c, (dy * phi).to(DB.dtype.element_ty), mask=mask)


def _tiles(rows: int, cols: int, tile: int):
    block_n = min(triton.next_power_of_2(max(cols, 1)), 1024)
    block_m = max(1, min(triton.next_power_of_2(max(rows, 1)), tile // block_n))
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(cols, block_n),)
    return block_m, block_n, grid


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _flags(spec: ActKind, has_b: bool, alpha):
    return dict(GATE=spec.gate, ORDER=spec.order, HAS_B=has_b, HAS_ALPHA=alpha is not None)


def glu_forward(a, b, alpha, spec: ActKind) -> torch.Tensor:
    """phi(a) [* b] for (R, N) views with unit column stride; returns a new (R, N) tensor."""
    rows, cols = a.shape
    y = torch.empty((rows, cols), dtype=a.dtype, device=a.device)
    block_m, block_n, grid = _tiles(rows, cols, TILE_FWD)
    al = a if alpha is None else alpha
    with on_device(a):
        _glu_fwd_kernel[grid](
            a, a if b is None else b, y, al,
            rows, cols, a.stride(0), 0 if b is None else b.stride(0), y.stride(0),
            **_flags(spec, b is not None, alpha), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
        )
    return y


def glu_backward(a, b, dy, alpha, spec: ActKind, da, db):
    """Writes dL/da into ``da`` and dL/db into ``db``; returns dL/dalpha (float32) or None."""
    rows, cols = a.shape
    dy = _unit_cols(dy)
    block_m, block_n, grid = _tiles(rows, cols, TILE_BWD)
    partial = None
    if alpha is not None and spec.gate not in (IDENTITY, RELU):
        partial = torch.empty(grid[0], dtype=torch.float32, device=a.device)
    with on_device(a):
        _glu_bwd_kernel[grid](
            a, a if b is None else b, dy, da, da if db is None else db,
            a if alpha is None else alpha, a if partial is None else partial,
            rows, cols, a.stride(0), 0 if b is None else b.stride(0), dy.stride(0), da.stride(0),
            0 if db is None else db.stride(0),
            **_flags(spec, b is not None, alpha), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
        )
    return None if partial is None else partial.sum()


class GatedActTriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.activation.torch_path.GatedActFunction`."""

    @staticmethod
    def forward(ctx, a, b, alpha, spec: ActKind, packed: bool):
        x = a
        a, b = unpack(x, b, packed)
        al = None if alpha is None else alpha.detach().float().reshape(())
        y = glu_forward(a, b, al, spec)
        ctx.spec, ctx.packed = spec, packed
        ctx.save_for_backward(x, None if packed else b, alpha)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, b, alpha = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, composed_rows, (x, b, alpha, ctx.spec, ctx.packed), dy)
        a, b = unpack(x, b, ctx.packed)
        dx, da, db = grad_buffers(x, b, ctx.packed, True, True)  # the kernel writes both
        al = None if alpha is None else alpha.detach().float().reshape(())
        dal = glu_backward(a, b, dy, al, ctx.spec, da, db)
        dalpha = None
        if alpha is not None and ctx.needs_input_grad[2]:
            dalpha = dal.to(alpha.dtype).reshape(alpha.shape)
        return input_grads(ctx.packed, dx, da, db, dalpha)


def _aot_specs():
    """Variants compiled by ``python -m gatezoo.kernels.aot``: every kind as a GLU (with alpha
    where the kind takes one, the superset of work) in float32, float16 and bfloat16, and every
    kind as a plain activation (no second operand) in float32."""
    specs = []
    variants = [(dtype, True) for dtype in ("fp32", "fp16", "bf16")] + [("fp32", False)]
    for dtype, has_b in variants:
        for spec in KINDS.values():
            if spec.gate == IDENTITY and not has_b:
                continue  # gated_act(x, "identity") launches nothing
            flags = _flags(spec, has_b, 0.0 if spec.takes_alpha else None)
            label = f"{'glu' if has_b else 'act'}_{{}}[{spec.name},{dtype}]"
            ptr = f"*{dtype}"
            specs.append(KernelSpec(
                label.format("fwd"), _glu_fwd_kernel,
                dict(A=ptr, B=ptr, Y=ptr, ALPHA="*fp32", R="i32", N="i32",
                     stride_a="i32", stride_b="i32", stride_y="i32"),
                {**flags, "BLOCK_M": TILE_FWD // 1024, "BLOCK_N": 1024}, NUM_WARPS,
            ))
            specs.append(KernelSpec(
                label.format("bwd"), _glu_bwd_kernel,
                dict(A=ptr, B=ptr, DY=ptr, DA=ptr, DB=ptr, ALPHA="*fp32", DALPHA="*fp32", R="i32", N="i32",
                     stride_a="i32", stride_b="i32", stride_dy="i32", stride_da="i32", stride_db="i32"),
                {**flags, "BLOCK_M": TILE_BWD // 1024, "BLOCK_N": 1024}, NUM_WARPS,
            ))
    return specs


register(_aot_specs)
