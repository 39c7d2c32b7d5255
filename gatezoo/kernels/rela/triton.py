"""Fused Triton kernels for ReLA attention.

Forward: one program per (query block, batch * head) walks the key blocks and accumulates
``relu(masked q k^T * scale) v`` in registers; there is no row max or row sum to track, and no
T x T matrix in memory. Fully masked key blocks are skipped: those entirely in the future when
causal, and those after a sequence's last kept key when there is a padding mask.

Backward (deterministic, no atomics): one kernel per key block computes dK and dV, looping
over the query blocks of every query head that shares the key head (grouped-query attention);
another per query block computes dQ. Both recompute the scores, with dS = dP * 1[S > 0].

Attention dropout (``DROPOUT``): every kernel recomputes which weights are dropped from the
seed with the position hash of :mod:`.dropout` (``_mix32`` below is its ``mix32`` in
``tl.uint32`` arithmetic, which wraps mod 2³² as the hash wants), so nothing is stored and the
three kernels agree with each other and with the torch path. A dropped weight is selected out
of the tile before its product; ``1/(1 - p)`` scales the accumulated result once, at the end.
With ``DROPOUT`` False none of it is compiled in.

Matrix products use the tensor cores: float16/bfloat16 directly, float32 inputs as TF32 (as
cuDNN and SDPA attention do, about 1e-3 relative error). Under the CPU interpreter every
product is exact float32. Second-order gradients differentiate :func:`~.naive.rela_composed`.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ..backend import composed_grads, interpret_mode, on_device
from ..kernel_specs import KernelSpec, register
from .dropout import threshold
from .naive import rela_composed_args


@triton.jit
def _load_tile(base, offs, stride, limit, offs_d, D, F32: tl.constexpr):
    """Rows ``offs`` (< limit) of a (T, D) matrix at ``base`` as a zero-padded (rows, BLOCK_D)
    tile, in float32 when ``F32``."""
    t = tl.load(base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :],
                mask=(offs[:, None] < limit) & (offs_d[None, :] < D), other=0.0)
    if F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (see :func:`.dropout.mix32`)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _head_hash(seed, bh):
    """``mix(seed ^ mix(bh))``: the part of the dropout hash shared by one flat query head
    ``bh``. ``seed`` arrives as the int32 with the seed's bits (see :func:`_seed_args`)."""
    return _mix32(seed.to(tl.uint32, bitcast=True) ^ _mix32(bh.to(tl.uint32)))


@triton.jit
def _kept(row_hash, cols, thresh):
    """True where ``mix(row_hash ^ cols) >= threshold``: the weight survives dropout. The two
    vectors broadcast (rows x keys, or keys x rows transposed)."""
    return _mix32(row_hash ^ cols.to(tl.uint32)) >= thresh.to(tl.uint32, bitcast=True)


@triton.jit
def _keep(offs_m, offs_n, mask_row, TQ, TK, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    keep = (offs_m[:, None] < TQ) & (offs_n[None, :] < TK)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (TK - TQ))
    if HAS_MASK:
        kp = tl.load(mask_row + offs_n, mask=offs_n < TK, other=0)
        keep = keep & (kp != 0)[None, :]
    return keep


@triton.jit
def _keep_t(offs_n, offs_m, mask_row, TQ, TK, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """:func:`_keep` transposed: (keys, queries)."""
    keep = (offs_n[:, None] < TK) & (offs_m[None, :] < TQ)
    if CAUSAL:
        keep = keep & (offs_n[:, None] <= offs_m[None, :] + (TK - TQ))
    if HAS_MASK:
        kp = tl.load(mask_row + offs_n, mask=offs_n < TK, other=0)
        keep = keep & (kp != 0)[:, None]
    return keep


@triton.jit
def _key_stop(pid_m, b, KV_STOP, TQ, TK, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """End of the keys that query block ``pid_m`` of sequence ``b`` can see: later key tiles
    are fully masked and skipped."""
    end_n = TK
    if CAUSAL:  # keys after the block's last query (bottom-right aligned) are in the future
        end_n = tl.minimum(TK, tl.maximum(0, (pid_m + 1) * BLOCK_M + TK - TQ))
    if HAS_MASK:  # key tiles after the last kept key of this sequence are all padding
        end_n = tl.minimum(end_n, tl.load(KV_STOP + b))
    return end_n


# seed and thresh are 32-bit patterns, not sizes: no specialisation on their values
@triton.jit(do_not_specialize=["seed", "thresh"])
def _rela_fwd_kernel(
    Q, K, V, O, MASK, KV_STOP, scale, seed, thresh, inv,  # noqa: E741
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, smb,
    H, G, TQ, TK, D,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, F32: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0 (up to 2^31 - 1 programs; axis 1 allows 65535)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, offs_m, sqm, TQ, offs_d, D, F32)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    mask_row = MASK + b.to(tl.int64) * smb
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if DROPOUT:
        row_hash = _mix32(_head_hash(seed, pid_bh) ^ offs_m.to(tl.uint32))
    for start_n in range(0, _key_stop(pid_m, b, KV_STOP, TQ, TK, CAUSAL, HAS_MASK, BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, TK, offs_d, D, F32)
        v = _load_tile(v_base, offs_n, svn, TK, offs_d, D, F32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else "tf32") * scale
        keep = _keep(offs_m, offs_n, mask_row, TQ, TK, CAUSAL, HAS_MASK)
        if DROPOUT:
            keep = keep & _kept(row_hash[:, None], offs_n[None, :], thresh)
        # relu that keeps NaN (as torch.relu does): a NaN score propagates, it does not become 0
        p = tl.where(keep, tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision="ieee" if IEEE else "tf32")
    if DROPOUT:
        acc = acc * inv
    tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64)[:, None] * som + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < TQ) & d_ok[None, :])


@triton.jit(do_not_specialize=["seed", "thresh"])
def _rela_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, MASK, KV_STOP, scale, seed, thresh, inv,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, smb,
    H, G, TQ, TK, D,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, F32: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bhk = tl.program_id(0)
    pid_n = tl.program_id(1)
    hk_count = H // G
    b = pid_bhk // hk_count
    hk = pid_bhk % hk_count
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    nd_ok = (offs_n[:, None] < TK) & d_ok[None, :]
    k = _load_tile(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh, offs_n, skn, TK, offs_d, D, F32)
    v = _load_tile(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh, offs_n, svn, TK, offs_d, D, F32)
    mask_row = MASK + b.to(tl.int64) * smb
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    start_m = 0
    if CAUSAL:  # queries before this one see none of these keys
        start_m = tl.maximum(0, pid_n * BLOCK_N - (TK - TQ)) // BLOCK_M * BLOCK_M
    if HAS_MASK:  # a tile of padding only: no query reads it, its gradients are 0
        start_m = tl.where(pid_n * BLOCK_N >= tl.load(KV_STOP + b), TQ, start_m)
    for gi in range(0, G):
        h = hk * G + gi
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
        if DROPOUT:
            head_hash = _head_hash(seed, b * H + h)
        for start in range(start_m, TQ, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, offs_m, sqm, TQ, offs_d, D, F32)
            do = _load_tile(do_base, offs_m, sdom, TQ, offs_d, D, F32)
            # everything transposed (keys x queries) so each product has the key block as its
            # M dimension: one shape of tensor-core tile (wgmma on sm_90) for all four
            st = tl.dot(k, tl.trans(q), input_precision="ieee" if IEEE else "tf32") * scale
            # st > 0 or NaN (one unordered compare): relu(st) keeps NaN, as in the forward
            keep = _keep_t(offs_n, offs_m, mask_row, TQ, TK, CAUSAL, HAS_MASK) & ~(st <= 0.0)
            if DROPOUT:  # the forward's mask, transposed: query hashes along the columns
                keep = keep & _kept(_mix32(head_hash ^ offs_m.to(tl.uint32))[None, :], offs_n[:, None], thresh)
            pt = tl.where(keep, st, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee" if IEEE else "tf32")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee" if IEEE else "tf32")
            dst = tl.where(keep, dpt, 0.0)
            dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee" if IEEE else "tf32")
    if DROPOUT:  # the kept weights' 1/(1 - p), once on the sums
        dk = dk * inv
        dv = dv * inv
    out = b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n.to(tl.int64)[:, None] * sdkn + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=nd_ok)
    out_v = b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n.to(tl.int64)[:, None] * sdvn + offs_d[None, :]
    tl.store(DV + out_v, dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit(do_not_specialize=["seed", "thresh"])
def _rela_bwd_dq_kernel(
    Q, K, V, DO, DQ, MASK, KV_STOP, scale, seed, thresh, inv,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm, smb,
    H, G, TQ, TK, D,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, F32: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0 (up to 2^31 - 1 programs; axis 1 allows 65535)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    md_ok = (offs_m[:, None] < TQ) & d_ok[None, :]
    q = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, offs_m, sqm, TQ, offs_d, D, F32)
    do = _load_tile(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh, offs_m, sdom, TQ, offs_d, D, F32)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    mask_row = MASK + b.to(tl.int64) * smb
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if DROPOUT:
        row_hash = _mix32(_head_hash(seed, pid_bh) ^ offs_m.to(tl.uint32))
    for start_n in range(0, _key_stop(pid_m, b, KV_STOP, TQ, TK, CAUSAL, HAS_MASK, BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, TK, offs_d, D, F32)
        v = _load_tile(v_base, offs_n, svn, TK, offs_d, D, F32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else "tf32") * scale
        keep = _keep(offs_m, offs_n, mask_row, TQ, TK, CAUSAL, HAS_MASK) & (s > 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee" if IEEE else "tf32")
        if DROPOUT:  # hashed after the product: its temporaries do not live across it
            keep = keep & _kept(row_hash[:, None], offs_n[None, :], thresh)
        ds = tl.where(keep, dp, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee" if IEEE else "tf32")
    if DROPOUT:
        dq = dq * inv
    tl.store(DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m.to(tl.int64)[:, None] * sdqm + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=md_ok)


def _blocks(d: int, kernel: str, wide: bool, interpret: bool | None = None, dropout: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of ``kernel`` ("fwd", "dkdv" or "dq") for head
    size d; ``wide`` for 4-byte (TF32) operands; ``dropout`` for the variants that hash a mask.
    Chosen so that every variant compiles without register spills and with a 64-row tensor-core
    tile (``make aot`` shows both)."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpret_mode() if interpret is None else interpret:
        return 16, 16, block_d, 4
    if dropout and wide and 64 < block_d <= 128 and kernel != "dkdv":
        # with TF32 operands the hash's temporaries spilled a few bytes at the settings below
        # (fwd: 24 bytes on sm_80; dq: 8 bytes on sm_90, which only a 16-key block cured)
        return (64, 32, block_d, 8) if kernel == "fwd" else (64, 16, block_d, 4)
    if kernel == "dkdv":  # key block = M of every product; holds k, v, dk and dv
        return (16, 64, block_d, 4) if block_d <= 64 and wide else (16, 64, block_d, 8)
    if block_d <= 64:
        return (64, 32, block_d, 4) if wide and kernel == "dq" else (64, 64, block_d, 4)
    if block_d <= 128:
        return (64, 32, block_d, 8) if wide and kernel == "dq" else (64, 32, block_d, 4)
    return 64, 16, block_d, 8


def _flags(q: torch.Tensor) -> dict:
    # The interpreter has no bfloat16/float16 arithmetic, so it multiplies in float32 (F32), and
    # exactly (IEEE). On a GPU float32 inputs use TF32 tensor cores, like cuDNN/SDPA attention.
    interp = interpret_mode()
    return dict(F32=q.dtype == torch.float32 or interp, IEEE=interp)


def _mask_args(mask, q):
    """(mask as uint8, per-sequence end of the last kept key, row stride); placeholders when no
    mask (HAS_MASK is then False and they are never read)."""
    if mask is None:
        return q, q, 0
    m = mask.to(torch.uint8).contiguous()
    positions = torch.arange(1, m.shape[1] + 1, device=m.device, dtype=torch.int32)
    kv_stop = (m.to(torch.int32) * positions).amax(1).to(torch.int32).contiguous()
    return m, kv_stop, m.stride(0)


def _seed_args(dropout_p: float, dropout_seed) -> dict:
    """The kernels' dropout arguments. The seed and the threshold are 32-bit patterns passed as
    int32 (values from 2**31 on wrap to negative) and reinterpreted as uint32 in the kernels, so
    every launch has the one argument type the ahead-of-time variants are built with; 0, 0 and
    1.0 with DROPOUT False, when the kernels never read them."""
    if dropout_p <= 0:
        return dict(seed=0, thresh=0, inv=1.0, DROPOUT=False)

    def i32(x: int) -> int:
        return x - (1 << 32) if x >= 1 << 31 else x

    return dict(seed=i32(int(dropout_seed)), thresh=i32(threshold(dropout_p)), inv=1.0 / (1.0 - dropout_p),
                DROPOUT=True)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rela_forward(q, k, v, key_padding_mask, causal: bool, scale: float, dropout_p: float = 0.0,
                 dropout_seed: int | None = None) -> torch.Tensor:
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    o = torch.empty((b, h, tq, d), dtype=q.dtype, device=q.device)
    bm, bn, bd, warps = _blocks(d, "fwd", q.dtype == torch.float32, dropout=dropout_p > 0)
    mask, kv_stop, smb = _mask_args(key_padding_mask, q)
    drop = _seed_args(dropout_p, dropout_seed)
    with on_device(q):
        _rela_fwd_kernel[(b * h, triton.cdiv(tq, bm))](
            q, k, v, o, mask, kv_stop, scale, drop.pop("seed"), drop.pop("thresh"), drop.pop("inv"),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), smb,
            h, h // hk, tq, tk, d,
            CAUSAL=causal, HAS_MASK=key_padding_mask is not None, **_flags(q), **drop,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
        )
    return o


def rela_backward(q, k, v, do, key_padding_mask, causal: bool, scale: float, dropout_p: float = 0.0,
                  dropout_seed: int | None = None):
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty((b, hk, tk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hk, tk, d), dtype=v.dtype, device=v.device)
    mask, kv_stop, smb = _mask_args(key_padding_mask, q)
    drop = _seed_args(dropout_p, dropout_seed)
    seed_args = (drop.pop("seed"), drop.pop("thresh"), drop.pop("inv"))
    flags = dict(CAUSAL=causal, HAS_MASK=key_padding_mask is not None, **_flags(q), **drop)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    with on_device(q):
        bm, bn, bd, warps = _blocks(d, "dkdv", q.dtype == torch.float32, dropout=dropout_p > 0)
        _rela_bwd_dkdv_kernel[(b * hk, triton.cdiv(tk, bn))](
            q, k, v, do, dk, dv, mask, kv_stop, scale, *seed_args, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), smb,
            h, h // hk, tq, tk, d, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
        )
        bm, bn, bd, warps = _blocks(d, "dq", q.dtype == torch.float32, dropout=dropout_p > 0)
        _rela_bwd_dq_kernel[(b * h, triton.cdiv(tq, bm))](
            q, k, v, do, dq, mask, kv_stop, scale, *seed_args, *strides,
            dq.stride(0), dq.stride(1), dq.stride(2), smb,
            h, h // hk, tq, tk, d, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
        )
    return dq, dk, dv


class ReLATriton(torch.autograd.Function):
    """Same contract as :class:`~gatezoo.kernels.rela.torch_path.ReLAFunction`."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal: bool, scale: float, dropout_p: float = 0.0,
                dropout_seed: int | None = None):
        ctx.causal, ctx.scale, ctx.dropout = causal, scale, (dropout_p, dropout_seed)
        ctx.save_for_backward(q, k, v, key_padding_mask)
        return rela_forward(q, k, v, key_padding_mask, causal, scale, dropout_p, dropout_seed)

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_padding_mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, rela_composed_args,
                                  (q, k, v, key_padding_mask, ctx.causal, ctx.scale, *ctx.dropout), do)
        dq, dk, dv = rela_backward(q, k, v, do, key_padding_mask, ctx.causal, ctx.scale, *ctx.dropout)
        return dq, dk, dv, None, None, None, None, None




def _aot_specs():
    """Forward, dK/dV and dQ, causal with a padding mask (the superset of work), for head sizes
    64 and 128 in bfloat16, float16 and float32 (TF32), and 256 in bfloat16; each without and
    with attention dropout (names ending in ``,dropout]``)."""
    specs = []
    ints = dict(H="i32", G="i32", TQ="i32", TK="i32", D="i32")
    strides = {n: "i32" for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn")}
    do_strides = {n: "i32" for n in ("sdob", "sdoh", "sdom")}
    variants = [(dt, d) for dt in ("bf16", "fp16", "fp32") for d in (64, 128)] + [("bf16", 256)]
    for dtype, d in variants:
        ptr = f"*{dtype}"
        common = dict(MASK="*u8", KV_STOP="*i32", scale="fp32", seed="i32", thresh="i32", inv="fp32", **strides)
        sigs = {
            "fwd": (_rela_fwd_kernel, "rela_fwd", dict(
                Q=ptr, K=ptr, V=ptr, O=ptr, **common, sob="i32", soh="i32", som="i32", smb="i32", **ints)),
            "dkdv": (_rela_bwd_dkdv_kernel, "rela_bwd_dkdv", dict(
                Q=ptr, K=ptr, V=ptr, DO=ptr, DK=ptr, DV=ptr, **common, **do_strides, sdkb="i32", sdkh="i32",
                sdkn="i32", sdvb="i32", sdvh="i32", sdvn="i32", smb="i32", **ints)),
            "dq": (_rela_bwd_dq_kernel, "rela_bwd_dq", dict(
                Q=ptr, K=ptr, V=ptr, DO=ptr, DQ=ptr, **common, **do_strides, sdqb="i32", sdqh="i32",
                sdqm="i32", smb="i32", **ints)),
        }
        for (kernel, (fn, name, sig)), dropout in itertools.product(sigs.items(), (False, True)):
            bm, bn, bd, warps = _blocks(d, kernel, dtype == "fp32", interpret=False, dropout=dropout)
            consts = dict(CAUSAL=True, HAS_MASK=True, F32=dtype == "fp32", IEEE=False, DROPOUT=dropout,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
            tag = ",dropout" if dropout else ""
            specs.append(KernelSpec(f"{name}[D{d},{dtype}{tag}]", fn, sig, consts, warps, matmul=True,
                                    unaligned=("TQ", "TK", "scale", "seed", "thresh", "inv")))
    return specs


register(_aot_specs)
