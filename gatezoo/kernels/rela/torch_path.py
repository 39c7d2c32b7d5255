"""The torch backend of ReLA: chunked, never holding a T x T tensor.

:class:`ReLAFunction` walks the score matrix in chunks (query rows forward, key rows backward),
saves only q, k, v (and the mask) and recomputes the scores in backward. It must match
:func:`~.naive.rela_composed`, which also gives its second-order gradients.

When every query head has its own key head, the operands are float32/float64 and one head's
whole stack of score matrices fits the chunk budget (short sequences: translation, ViT), it goes
head by head instead (:func:`_per_head_forward`): bmm reads each head's strided (B, T, D) view
of q, k, v in place, so nothing is copied into a merged (B * H) batch, and the output and the
gradients are written in (B, T, H, D) storage, the layout the attention block joins its heads
in. On (64, 4, 40, 64) this made ReLA's forward+backward cost what SDPA's does.

Attention dropout (``dropout_p > 0``) zeroes the dropped weights of each score chunk, chosen by
the position hash of :mod:`.dropout`, which backward recomputes chunk by chunk like the scores
(no mask is stored); the factor ``1/(1 - p)`` rides in the products' ``alpha`` or scales the
small (rows, D) results. With ``dropout_p = 0`` none of this runs.
"""

from __future__ import annotations

import torch

from ..backend import composed_grads
from ..scratch import Scratch
from .dropout import dropped, row_hash, threshold
from .naive import rela_composed_args

# Scores of one chunk on CPU: at most 2^21 float32 (8 MiB; backward holds two such buffers). A
# chunk takes whole rows of the score matrix where that fits with at least PAR_HEADS heads side by
# side: every matmul then writes a contiguous slice of its output (a strided one costs a copy), and
# with two or more matrices in a batch each thread multiplies whole matrices. Causal chunks take at
# most CAUSAL_ROWS rows so that most of the masked half is skipped. Measured at B=4, H=8, T=1024,
# D=64 on 2 threads: the forward ran ~10% faster with whole rows than with 512-row chunks; causal
# forward+backward was 1.10x SDPA's time with 128 rows, 1.13x with 256 and 1.33x with 512.
CPU_CHUNK_SCORES = 1 << 21
PAR_HEADS = 2
CAUSAL_ROWS = 128
# dq^T sums products over at most this many key rows at a time: that product alone ran ~15%
# faster in two halves of 512 rows than over all 1024 at T=1024 on 2 threads
DQ_K = 512


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_key_stop(causal: bool, tq: int, tk: int, q_stop: int) -> int:
    """Keys beyond this index are masked for every query of the chunk (causal only)."""
    return tk if not causal else max(0, min(tk, q_stop + tk - tq))


def _plan(bh: int, rows: int, cols: int, causal: bool, device) -> tuple[int, int]:
    """(heads, rows) of one chunk of a (bh, rows, cols) stack of score matrices."""
    if device.type != "cpu":
        return bh, rows
    r = min(rows, max(1, CPU_CHUNK_SCORES // (min(bh, PAR_HEADS) * cols)))
    if causal:
        r = min(r, CAUSAL_ROWS)
    return max(1, min(bh, CPU_CHUNK_SCORES // (r * cols))), r


def _chunks(bh: int, rows: int, cols: int, causal: bool, device):
    """(head slice, row slice) pairs covering a (bh, rows, cols) stack of score matrices."""
    heads, r = _plan(bh, rows, cols, causal, device)
    return [(slice(c, min(bh, c + heads)), slice(i, min(rows, i + r)))
            for c in range(0, bh, heads) for i in range(0, rows, r)]


class _Dropout:
    """Attention dropout at rate ``p`` with ``seed``: the hash threshold and the scale of the
    kept weights."""

    def __init__(self, p: float, seed: int):
        self.seed, self.thresh, self.inv = seed, threshold(p), 1.0 / (1.0 - p)

    def apply_(self, s: torch.Tensor, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Zero the dropped weights of ``s`` in place: ``bh`` (flat query heads), ``rows`` (query
        indices) and ``cols`` (key indices) broadcast to the shape of ``s``. A select, so a
        dropped inf or NaN weight becomes 0."""
        return s.masked_fill_(dropped(row_hash(self.seed, bh, rows), cols, self.thresh), 0.0)


def _dropout(dropout_p: float, dropout_seed) -> _Dropout | None:
    return _Dropout(dropout_p, dropout_seed) if dropout_p > 0 else None


class _Problem:
    """The operands as (B * Hk, ...) stacks in the compute dtype: one row of the stack per key
    head, its G query heads side by side."""

    def __init__(self, q, k, v, key_padding_mask, causal, scale, drop: _Dropout | None = None):
        b, h, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        self.cdt = _compute_dtype(q.dtype)
        self.b, self.h, self.hk, self.g, self.tq, self.tk, self.d = b, h, hk, h // hk, tq, tk, d
        self.q = q.to(self.cdt).reshape(b * hk, self.g, tq, d)
        self.k = k.to(self.cdt).reshape(b * hk, tk, d)
        self.v = v.to(self.cdt).reshape(b * hk, tk, d)
        self.causal, self.scale, self.drop = causal, scale, drop
        # padded keys per key head (True = padding), broadcast over the query rows
        self.pad = None
        if key_padding_mask is not None:
            self.pad = ~key_padding_mask.repeat_interleave(hk, 0)[:, None, :]
        self.bufs = Scratch(self.cdt, q.device)

    def rows_of(self, t, cs, rs, name):
        """Rows ``rs`` of the key-head stacks ``cs`` of a (B * Hk, G, T, D) tensor as (n, G * rows,
        D): a view when that is possible (bmm reads a strided batch in place), else a copy into
        a buffer."""
        n, rows = cs.stop - cs.start, rs.stop - rs.start
        sel = t[cs, :, rs]
        if self.g == 1:
            return sel[:, 0]
        if sel.is_contiguous():
            return sel.view(n, self.g * rows, self.d)
        return self.bufs.get(name, n, self.g, rows, self.d).copy_(sel).view(n, self.g * rows, self.d)

    def queries(self, cs, rs):
        """Queries of the chunk, (n, G * rows, D)."""
        return self.rows_of(self.q, cs, rs, "q")

    def relu_scores(self, qc, cs, rs, stop):
        """relu(masked q k^T * scale) of the chunk, (n, G * rows, stop): query rows ``rs``, keys
        up to ``stop``."""
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
        if self.drop is not None:
            dev = s.device
            self.drop.apply_(s.view(n, self.g, rows, stop), self.heads_of(cs)[:, :, None, None],
                             torch.arange(rs.start, rs.stop, device=dev)[:, None], torch.arange(stop, device=dev))
        return s

    def heads_of(self, cs) -> torch.Tensor:
        """Flat query-head indices ``b·H + h`` of the key-head stacks ``cs``, (n, G): stack ``c``
        holds query heads ``c·G`` to ``c·G + G - 1``."""
        dev = self.q.device
        return torch.arange(cs.start, cs.stop, device=dev)[:, None] * self.g + torch.arange(self.g, device=dev)

    def relu_scores_t(self, qc, cs, ks, q0):
        """The transposed chunk relu(masked k q^T * scale), (n, rows, G * (Tq - q0)): key rows
        ``ks`` against the queries from ``q0`` on."""
        n, rows, nq = cs.stop - cs.start, ks.stop - ks.start, self.tq - q0
        s = self.bufs.get("s", n, rows, self.g * nq)
        torch.baddbmm(s, self.k[cs, ks], qc.transpose(1, 2), beta=0.0, alpha=self.scale, out=s).relu_()
        off = self.tk - self.tq
        if self.causal and ks.stop - 1 > q0 + off:  # the last key is in the future of the first query
            j = torch.arange(ks.start, ks.stop, device=s.device)[:, None]
            i = torch.arange(q0, self.tq, device=s.device)[None, :]
            s.view(n, rows, self.g, nq).masked_fill_((j > i + off)[:, None, :], 0.0)
        if self.pad is not None:
            s.masked_fill_(self.pad[cs, 0, ks][:, :, None], 0.0)
        if self.drop is not None:
            dev = s.device
            keys = torch.arange(ks.start, ks.stop, device=dev)[:, None, None]
            self.drop.apply_(s.view(n, rows, self.g, nq), self.heads_of(cs)[:, None, :, None],
                             torch.arange(q0, self.tq, device=dev), keys)
        return s


def _per_head_ok(q, k, v, causal: bool) -> bool:
    """The per-head path applies: CPU, one query head per key head, float32/float64 operands
    (nothing to convert), and one head's whole stack of score matrices within the chunk budget
    (short causal rows only, as in the chunk plan)."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    return (q.device.type == "cpu" and k.shape[1] == h and q.dtype in (torch.float32, torch.float64)
            and k.dtype == q.dtype and v.dtype == q.dtype and b * tq * tk <= CPU_CHUNK_SCORES
            and (not causal or tq <= CAUSAL_ROWS))


def _head_scores(qh, kh, pad, causal: bool, scale: float, out, drop: _Dropout | None = None, head: int = 0,
                 heads: int = 1):
    """relu(masked qh khᵀ * scale) of one head, (B, Tq, Tk), into ``out``; with ``drop``, the
    weights it drops for query head ``head`` of ``heads`` are zeroed (not yet scaled)."""
    tq, tk = qh.shape[1], kh.shape[1]
    torch.baddbmm(out, qh, kh.transpose(1, 2), beta=0.0, alpha=scale, out=out).relu_()
    if causal and tk - tq < tk - 1:  # some query misses some key
        i = torch.arange(tq, device=out.device)[:, None]
        j = torch.arange(tk, device=out.device)[None, :]
        out.masked_fill_(j > i + (tk - tq), 0.0)  # a select: masked inf or NaN scores become 0
    if pad is not None:
        out.masked_fill_(pad, 0.0)
    if drop is not None:
        dev = out.device
        drop.apply_(out, torch.arange(out.shape[0], device=dev)[:, None, None] * heads + head,
                    torch.arange(tq, device=dev)[:, None], torch.arange(tk, device=dev))
    return out


def _per_head_forward(q, k, v, key_padding_mask, causal: bool, scale: float, drop: _Dropout | None = None):
    """ReLA one head at a time on strided (B, T, D) views of every head: no copy of q, k, v,
    and the output is written in (B, Tq, H, D) storage, so joining the heads afterwards
    (``o.transpose(1, 2).reshape(B, Tq, H * D)``) is a view."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = torch.empty((b, tq, h, d), dtype=q.dtype, device=q.device)
    pad = None if key_padding_mask is None else ~key_padding_mask[:, None, :]
    s = torch.empty((b, tq, tk), dtype=q.dtype, device=q.device)
    o = torch.empty((b, tq, d), dtype=q.dtype, device=q.device)
    for i in range(h):
        _head_scores(q[:, i], k[:, i], pad, causal, scale, s, drop, i, h)
        # bmm reads strided operands in place but loops matrix by matrix into a strided output:
        # through a contiguous buffer instead
        if drop is None:
            out[:, :, i].copy_(torch.bmm(s, v[:, i], out=o))
        else:
            out[:, :, i].copy_(torch.baddbmm(o, s, v[:, i], beta=0.0, alpha=drop.inv, out=o))
    return out.transpose(1, 2)


def _per_head_grads(q, k, v, key_padding_mask, causal: bool, scale: float, do, drop: _Dropout | None = None):
    """dq, dk, dv of :func:`_per_head_forward`, each written in (B, T, H, D) storage (the layout
    of q, k, v when a fused projection made them), scores recomputed one head at a time."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    dq = torch.empty((b, tq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, tk, h, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((b, tk, h, d), dtype=q.dtype, device=q.device)
    pad = None if key_padding_mask is None else ~key_padding_mask[:, None, :]
    do = do.to(q.dtype)
    p = torch.empty((b, tq, tk), dtype=q.dtype, device=q.device)
    ds = torch.empty((b, tq, tk), dtype=q.dtype, device=q.device)
    gq = torch.empty((b, tq, d), dtype=q.dtype, device=q.device)
    gk = torch.empty((b, tk, d), dtype=q.dtype, device=q.device)
    # dropout: P holds the kept weights unscaled; 1/(1 - p) rides in every product's alpha, and
    # 1[P > 0] is then 1[S > 0 and kept], the mask dS needs
    inv = 1.0 if drop is None else drop.inv
    for i in range(h):  # each product into a contiguous buffer, then into its strided place
        qh, kh, vh, doh = q[:, i], k[:, i], v[:, i], do[:, i]
        _head_scores(qh, kh, pad, causal, scale, p, drop, i, h)
        if drop is None:
            dv[:, :, i].copy_(torch.bmm(p.transpose(1, 2), doh, out=gk))  # dv = Pᵀ dO
        else:
            dv[:, :, i].copy_(torch.baddbmm(gk, p.transpose(1, 2), doh, beta=0.0, alpha=inv, out=gk))
        torch.bmm(doh, vh.transpose(1, 2), out=ds)  # dP = dO vᵀ
        torch.ops.aten.threshold_backward.grad_input(ds, p, 0.0, grad_input=ds)  # dS = dP 1[S > 0]
        dq[:, :, i].copy_(torch.baddbmm(gq, ds, kh, beta=0.0, alpha=scale * inv, out=gq))  # dq = scale dS k
        dk[:, :, i].copy_(torch.baddbmm(gk, ds.transpose(1, 2), qh, beta=0.0, alpha=scale * inv, out=gk))
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class ReLAFunction(torch.autograd.Function):
    """relu(q k^T * scale, masked) v in chunks; saves only q, k, v and the mask.

    Shapes: q (B, H, Tq, D); k, v (B, Hk, Tk, D); key_padding_mask bool (B, Tk) or None.
    ``dropout_p`` and ``dropout_seed``: attention dropout (:mod:`.dropout`), off at 0.

    Forward walks the scores by query rows. Backward walks them by key rows and builds each chunk
    transposed, keys by queries: then ``dv = P^T dO``, ``dk = dS^T q`` and ``dq^T = k^T dS^T``
    are all products of untransposed score chunks (MKL ran them 20-30% faster here than products
    that read a score chunk transposed). Causal chunks start at the first query that sees them.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal: bool, scale: float, dropout_p: float = 0.0,
                dropout_seed: int | None = None):
        ctx.causal, ctx.scale, ctx.dropout = causal, scale, (dropout_p, dropout_seed)
        ctx.save_for_backward(q, k, v, key_padding_mask)
        drop = _dropout(dropout_p, dropout_seed)
        if _per_head_ok(q, k, v, causal):
            return _per_head_forward(q, k, v, key_padding_mask, causal, scale, drop)
        pb = _Problem(q, k, v, key_padding_mask, causal, scale, drop)
        bhk = pb.b * pb.hk
        out = torch.empty((bhk, pb.g, pb.tq, pb.d), dtype=pb.cdt, device=q.device)
        for cs, rs in _chunks(bhk, pb.tq, pb.g * pb.tk, causal, q.device):
            n, rows = cs.stop - cs.start, rs.stop - rs.start
            stop = _causal_key_stop(causal, pb.tq, pb.tk, rs.stop)
            if stop == 0:  # every key of these queries is in the future
                out[cs, :, rs].zero_()
                continue
            p = pb.relu_scores(pb.queries(cs, rs), cs, rs, stop)
            if rows == pb.tq:  # whole rows: the product lands in place
                o = torch.bmm(p, pb.v[cs, :stop], out=out[cs].view(n, pb.g * rows, pb.d))
            else:
                o = torch.bmm(p, pb.v[cs, :stop], out=pb.bufs.get("o", n, pb.g * rows, pb.d))
            if drop is not None:  # the kept weights' 1/(1 - p), on the (rows, D) product
                o.mul_(drop.inv)
            if rows != pb.tq:
                out[cs, :, rs].copy_(o.view(n, pb.g, rows, pb.d))
        return out.view(pb.b, pb.h, pb.tq, pb.d).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_padding_mask = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, rela_composed_args, (q, k, v, key_padding_mask, causal, scale, *ctx.dropout), do)
        drop = _dropout(*ctx.dropout)
        if _per_head_ok(q, k, v, causal):
            grads = _per_head_grads(q, k, v, key_padding_mask, causal, scale, do, drop)
        else:
            grads = _chunked_grads(q, k, v, key_padding_mask, causal, scale, do, drop)
        return (*grads, None, None, None, None, None)


def _chunked_grads(q, k, v, key_padding_mask, causal, scale, do, drop: _Dropout | None = None):
    """dq, dk, dv of :class:`ReLAFunction`, recomputing the scores chunk by chunk, transposed:
    key rows by query columns (and the dropout mask with them)."""
    pb = _Problem(q, k, v, key_padding_mask, causal, scale, drop)
    # dropout: P holds the kept weights unscaled (see _per_head_grads)
    inv = 1.0 if drop is None else drop.inv
    bhk, g, tq, tk, d = pb.b * pb.hk, pb.g, pb.tq, pb.tk, pb.d
    do_ = do.to(pb.cdt).reshape(bhk, g, tq, d)
    dq = torch.empty((bhk, g, tq, d), dtype=pb.cdt, device=q.device)
    dk = torch.empty((bhk, tk, d), dtype=pb.cdt, device=q.device)
    dv = torch.empty((bhk, tk, d), dtype=pb.cdt, device=q.device)
    heads, rows = _plan(bhk, tk, g * tq, causal, q.device)
    for c in range(0, bhk, heads):
        cs = slice(c, min(bhk, c + heads))
        n = cs.stop - cs.start
        # dq^T = scale k^T dS^T, summed over the key chunks: (n, D, G * Tq)
        dqt = pb.bufs.get("dqt", n, d, g * tq)
        if causal and tq > tk:  # the first queries see no key: no chunk writes their columns
            dqt.zero_()
        for j in range(0, tk, rows):
            ks = slice(j, min(tk, j + rows))
            nk = ks.stop - ks.start
            # first query that sees these keys (the last query sees every key)
            q0 = max(0, j - (tk - tq)) if causal else 0
            qs, nq = slice(q0, tq), tq - q0
            qc, do_c = pb.rows_of(pb.q, cs, qs, "q"), pb.rows_of(do_, cs, qs, "do")
            kc = pb.k[cs, ks]
            p = pb.relu_scores_t(qc, cs, ks, q0)  # P^T
            whole = nk == tk  # dk[cs], dv[cs] are contiguous: write them in place
            dv_c = torch.bmm(p, do_c, out=dv[cs] if whole else pb.bufs.get("kv", n, nk, d))
            if drop is not None:
                dv_c.mul_(inv)
            if not whole:
                dv[cs, ks].copy_(dv_c)
            ds = torch.bmm(pb.v[cs, ks], do_c.transpose(1, 2), out=pb.bufs.get("ds", n, nk, g * nq))
            torch.ops.aten.threshold_backward.grad_input(ds, p, 0.0, grad_input=ds)  # dS^T = dP^T 1[S > 0]
            dk_c = dk[cs] if whole else pb.bufs.get("kv", n, nk, d)
            torch.baddbmm(dk_c, ds, qc, beta=0.0, alpha=scale * inv, out=dk_c)  # dk = scale dS^T q
            if not whole:
                dk[cs, ks].copy_(dk_c)
            # queries from q0 on: in place when that is every query, else through a buffer
            part = dqt if q0 == 0 else pb.bufs.get("dq", n, d, g * nq)
            for a in range(0, nk, DQ_K):
                fresh = a == 0 and (j == 0 or q0 > 0)
                part.baddbmm_(kc[:, a:a + DQ_K].transpose(1, 2), ds[:, a:a + DQ_K], beta=0.0 if fresh else 1.0,
                              alpha=scale * inv)
            if q0 > 0:
                dqt.view(n, d, g, tq)[..., q0:].add_(part.view(n, d, g, nq))
        dq[cs].copy_(dqt.view(n, d, g, tq).permute(0, 2, 3, 1))
    dq = dq.view(pb.b, pb.h, tq, d).to(q.dtype)
    dk = dk.view(pb.b, pb.hk, tk, d).to(k.dtype)
    dv = dv.view(pb.b, pb.hk, tk, d).to(v.dtype)
    return dq, dk, dv
