"""PyTorch reference for ReLA, rectified linear attention (Zhang, Titov & Sennrich 2021).

    S = (q k^T) * scale, with masked entries (padded keys, future keys when causal) set to 0
    O = relu(S) v                     no normalisation over keys

* :func:`rela_composed` is the readable version that builds the whole T x T matrix: the float64
  oracle in the tests and the "naive" peer in the benchmarks.
* :class:`ReLAFunction` is the torch backend: it walks the queries in chunks, never keeps a
  T x T tensor, saves only q, k, v (and the mask) and recomputes the scores in backward.

Grouped-query attention: k and v may have ``Hk`` heads with ``H % Hk == 0``; query head ``h``
reads key/value head ``h // (H // Hk)``. Causal attention with ``Tq != Tk`` is aligned
bottom-right: query ``i`` sees keys ``j <= i + Tk - Tq`` (incremental decoding).
"""

from __future__ import annotations

import torch

from ..scratch import Scratch

# Scores of one chunk on CPU: at most 2^20 float32 (4 MiB) where rows allow, so a chunk's scores
# and their gradient stay near the core between the matmuls that write and read them; chunks
# take ROWS query rows (or fewer heads) so each matmul still has a useful size. Measured at B=4,
# H=8, T=1024, D=64 against 2^18-2^20 scores and 128-512 rows; memory stays linear in T.
CPU_CHUNK_SCORES = 1 << 20
ROWS = 512


def keep_mask(tq: int, tk: int, causal: bool, key_padding_mask, device):
    """Bool mask of the scores that survive, broadcastable to (B, 1, Tq, Tk), or None when
    nothing is masked."""
    keep = None
    if causal:
        i = torch.arange(tq, device=device)[:, None]
        j = torch.arange(tk, device=device)[None, :]
        keep = j <= i + (tk - tq)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        keep = pad if keep is None else keep & pad
    return keep


def rela_composed(q, k, v, causal: bool = False, key_padding_mask=None, scale=None):
    """ReLA as one composition over the full score matrix (autograd differentiates it)."""
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = keep_mask(tq, tk, causal, key_padding_mask, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, 0.0)
    return torch.matmul(torch.relu(s), v)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_key_stop(causal: bool, tq: int, tk: int, q_stop: int) -> int:
    """Keys beyond this index are masked for every query of the chunk (causal only)."""
    return tk if not causal else max(0, min(tk, q_stop + tk - tq))


def _chunks(bhk: int, tq: int, tk: int, g: int, device):
    """(key-head slice, query rows slice) pairs covering (B * Hk) x Tq."""
    if device.type != "cpu":
        return [(slice(0, bhk), slice(0, tq))]
    rows = max(1, min(tq, ROWS, CPU_CHUNK_SCORES // max(g * tk, 1)))
    heads = max(1, min(bhk, CPU_CHUNK_SCORES // max(g * rows * tk, 1)))
    return [(slice(c, min(bhk, c + heads)), slice(i, min(tq, i + rows)))
            for c in range(0, bhk, heads) for i in range(0, tq, rows)]


class _Problem:
    """The operands as (B * Hk, ...) stacks in the compute dtype: one row of the stack per key
    head, its G query heads side by side."""

    def __init__(self, q, k, v, key_padding_mask, causal, scale):
        b, h, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        self.cdt = _compute_dtype(q.dtype)
        self.b, self.h, self.hk, self.g, self.tq, self.tk, self.d = b, h, hk, h // hk, tq, tk, d
        self.q = q.to(self.cdt).reshape(b * hk, self.g, tq, d)
        self.k = k.to(self.cdt).reshape(b * hk, tk, d)
        self.v = v.to(self.cdt).reshape(b * hk, tk, d)
        self.causal, self.scale = causal, scale
        # padded keys per key head (True = padding), broadcast over the query rows
        self.pad = None
        if key_padding_mask is not None:
            self.pad = ~key_padding_mask.repeat_interleave(hk, 0)[:, None, :]
        self.bufs = Scratch(self.cdt, q.device)

    def rows_of(self, t, cs, rs, name):
        """Rows ``rs`` of the key-head stacks ``cs`` of a (B * Hk, G, T, D) tensor as (n, G * rows,
        D): a strided view when G == 1 (bmm reads it in place), else a copy into a buffer."""
        n, rows = cs.stop - cs.start, rs.stop - rs.start
        if self.g == 1:
            return t[cs, 0, rs]
        return self.bufs.get(name, n, self.g, rows, self.d).copy_(t[cs, :, rs]).view(n, self.g * rows, self.d)

    def queries(self, cs, rs):
        """Queries of the chunk, (n, G * rows, D)."""
        return self.rows_of(self.q, cs, rs, "q")

    def relu_scores(self, qc, cs, rs, stop):
        """relu(masked q k^T * scale) of the chunk, (n, G * rows, stop)."""
        n, rows = cs.stop - cs.start, rs.stop - rs.start
        s = self.bufs.get("s", n, self.g * rows, stop)
        # the scale rides in the GEMM (alpha) instead of a pass over the scores
        torch.baddbmm(s, qc, self.k[cs, :stop].transpose(1, 2), beta=0.0, alpha=self.scale, out=s).relu_()
        if self.causal and rs.start + self.tk - self.tq < stop - 1:  # the first row misses some keys
            i = torch.arange(rs.start, rs.stop, device=s.device)[:, None]
            j = torch.arange(stop, device=s.device)[None, :]
            # a select, not a product: a masked score that is inf or NaN must still become 0
            s.view(n, self.g, rows, stop).masked_fill_(j > i + (self.tk - self.tq), 0.0)
        if self.pad is not None:
            s.masked_fill_(self.pad[cs, :, :stop], 0.0)
        return s


class ReLAFunction(torch.autograd.Function):
    """relu(q k^T * scale, masked) v in chunks; saves only q, k, v and the mask.

    Shapes: q (B, H, Tq, D); k, v (B, Hk, Tk, D); key_padding_mask bool (B, Tk) or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal: bool, scale: float):
        pb = _Problem(q, k, v, key_padding_mask, causal, scale)
        out = torch.empty((pb.b * pb.hk, pb.g, pb.tq, pb.d), dtype=pb.cdt, device=q.device)
        for cs, rs in _chunks(pb.b * pb.hk, pb.tq, pb.tk, pb.g, q.device):
            n, rows = cs.stop - cs.start, rs.stop - rs.start
            stop = _causal_key_stop(causal, pb.tq, pb.tk, rs.stop)
            if stop == 0:  # every key of these queries is in the future
                out[cs, :, rs].zero_()
                continue
            p = pb.relu_scores(pb.queries(cs, rs), cs, rs, stop)
            o = torch.bmm(p, pb.v[cs, :stop], out=pb.bufs.get("o", n, pb.g * rows, pb.d))
            out[cs, :, rs].copy_(o.view(n, pb.g, rows, pb.d))
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, key_padding_mask)
        return out.view(pb.b, pb.h, pb.tq, pb.d).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_padding_mask = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return _composed_grads(ctx, q, k, v, key_padding_mask, do) + (None, None, None)
        pb = _Problem(q, k, v, key_padding_mask, causal, scale)
        do_ = do.to(pb.cdt).reshape(pb.b * pb.hk, pb.g, pb.tq, pb.d)
        dq = torch.empty((pb.b * pb.hk, pb.g, pb.tq, pb.d), dtype=pb.cdt, device=q.device)
        dk = torch.zeros((pb.b * pb.hk, pb.tk, pb.d), dtype=pb.cdt, device=q.device)
        dv = torch.zeros((pb.b * pb.hk, pb.tk, pb.d), dtype=pb.cdt, device=q.device)
        for cs, rs in _chunks(pb.b * pb.hk, pb.tq, pb.tk, pb.g, q.device):
            n, rows = cs.stop - cs.start, rs.stop - rs.start
            stop = _causal_key_stop(causal, pb.tq, pb.tk, rs.stop)
            if stop == 0:
                dq[cs, :, rs].zero_()
                continue
            qc = pb.queries(cs, rs)
            p = pb.relu_scores(qc, cs, rs, stop)
            do_c = pb.rows_of(do_, cs, rs, "do")
            dv[cs, :stop].baddbmm_(p.transpose(1, 2), do_c)
            ds = torch.bmm(do_c, pb.v[cs, :stop].transpose(1, 2), out=pb.bufs.get("ds", n, pb.g * rows, stop))
            torch.ops.aten.threshold_backward.grad_input(ds, p, 0.0, grad_input=ds)  # dS = dP 1[S > 0]
            dq_c = pb.bufs.get("o", n, pb.g * rows, pb.d)
            torch.baddbmm(dq_c, ds, pb.k[cs, :stop], beta=0.0, alpha=scale, out=dq_c)  # dq = scale dS k
            dq[cs, :, rs].copy_(dq_c.view(n, pb.g, rows, pb.d))
            dk[cs, :stop].baddbmm_(ds.transpose(1, 2), qc, alpha=scale)  # dk = scale dS^T q
        dq = dq.view(pb.b, pb.h, pb.tq, pb.d).to(q.dtype)
        dk = dk.view(pb.b, pb.hk, pb.tk, pb.d).to(k.dtype)
        dv = dv.view(pb.b, pb.hk, pb.tk, pb.d).to(v.dtype)
        return dq, dk, dv, None, None, None


def _composed_grads(ctx, q, k, v, key_padding_mask, do):
    wrt = [(i, t) for i, t in enumerate((q, k, v)) if ctx.needs_input_grad[i]]
    with torch.enable_grad():
        o = rela_composed(q, k, v, ctx.causal, key_padding_mask, ctx.scale)
        grads = torch.autograd.grad(o, [t for _, t in wrt], do, create_graph=True)
    out = [None, None, None]
    for (i, _), gr in zip(wrt, grads):
        out[i] = gr
    return tuple(out)
