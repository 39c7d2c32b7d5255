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

# Elements of one chunk of scores (B * H * rows * Tk) on CPU: 16 MiB of float32. Large enough
# for efficient matmuls (smaller chunks measured slower at B=4 H=8 T=1024 D=64), and bounded, so
# memory stays linear in T: no T x T tensor is ever held.
CPU_CHUNK_SCORES = 1 << 22


def keep_mask(tq: int, tk: int, causal: bool, key_padding_mask, device, q_start: int = 0, q_stop=None):
    """Bool mask of the scores that survive, broadcastable to (B, 1, rows, Tk), or None when
    nothing is masked. Rows are the queries ``q_start:q_stop``."""
    q_stop = tq if q_stop is None else q_stop
    keep = None
    if causal:
        i = torch.arange(q_start, q_stop, device=device)[:, None]
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


def _rows_per_chunk(b: int, h: int, tq: int, tk: int, device) -> int:
    if device.type != "cpu":
        return tq
    return max(1, min(tq, CPU_CHUNK_SCORES // max(b * h * tk, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_key_stop(causal: bool, tq: int, tk: int, q_stop: int) -> int:
    """Keys beyond this index are masked for every query of the chunk (causal only)."""
    return tk if not causal else max(0, min(tk, q_stop + tk - tq))


class _Buffers:
    """Named scratch buffers reused by every chunk (fresh ones would be page-faulted in again
    for each chunk); ``get(name, *shape)`` returns a contiguous view of the needed size."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.bufs = dtype, device, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, dtype=self.dtype, device=self.device)
        return buf[:n].view(shape)


class _Chunk:
    """Queries i0:i1 of every head, grouped by key head: (B * Hk, G * rows, ...) matrices."""

    def __init__(self, q, kc, i0, i1, causal, key_padding_mask, scale, bufs):
        b, h, tq, d = q.shape
        hk, tk = kc.shape[1], kc.shape[2]
        self.g, self.rows = h // hk, i1 - i0
        self.stop = _causal_key_stop(causal, tq, tk, i1)
        self.b, self.hk, self.d = b, hk, d
        # the scale goes on the (rows x D) queries, not on the (rows x Tk) scores
        qs = bufs.get("q", b, h, self.rows, d)
        qs.copy_(q[:, :, i0:i1]).mul_(scale)
        self.q3 = qs.view(b * hk, self.g * self.rows, d)
        self.i0, self.i1, self.tq, self.tk = i0, i1, tq, tk
        self.causal, self.key_padding_mask = causal, key_padding_mask

    def relu_scores(self, k3, out):
        """relu(masked q k^T * scale) into ``out`` (B * Hk, G * rows, stop)."""
        s = torch.bmm(self.q3, k3[:, : self.stop].transpose(1, 2), out=out).relu_()
        keep = keep_mask(self.tq, self.tk, self.causal, self.key_padding_mask, out.device, self.i0, self.i1)
        if keep is not None:
            keep = keep[..., : self.stop]
            if self.causal:  # the (rows, Tk) pattern repeats for the G query heads of a key head
                keep = keep.repeat(self.g, 1) if self.key_padding_mask is None else keep.repeat(1, 1, self.g, 1)
            s.view(self.b, self.hk, self.g * self.rows, self.stop).mul_(keep)
        return s

    def heads(self, t):
        """(B * Hk, G * rows, D) -> (B, H, rows, D)."""
        return t.view(self.b, self.hk * self.g, self.rows, self.d)


class ReLAFunction(torch.autograd.Function):
    """relu(q k^T * scale, masked) v in query chunks; saves only q, k, v and the mask.

    Shapes: q (B, H, Tq, D); k, v (B, Hk, Tk, D); key_padding_mask bool (B, Tk) or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal: bool, scale: float):
        b, h, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        cdt = _compute_dtype(q.dtype)
        k3 = k.to(cdt).contiguous().view(b * hk, tk, d)
        v3 = v.to(cdt).contiguous().view(b * hk, tk, d)
        out = torch.empty((b, h, tq, d), dtype=q.dtype, device=q.device)
        bufs = _Buffers(cdt, q.device)
        step = _rows_per_chunk(b, h, tq, tk, q.device)
        for i0 in range(0, tq, step):
            c = _Chunk(q, k3.view(b, hk, tk, d), i0, min(tq, i0 + step),
                       causal, key_padding_mask, scale, bufs)
            if c.stop == 0:  # every key of these queries is in the future
                out[:, :, c.i0 : c.i1].zero_()
                continue
            p = c.relu_scores(k3, bufs.get("s", b * hk, c.g * c.rows, c.stop))
            o = torch.bmm(p, v3[:, : c.stop], out=bufs.get("o", b * hk, c.g * c.rows, d))
            out[:, :, c.i0 : c.i1].copy_(c.heads(o))
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, key_padding_mask)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_padding_mask = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return _composed_grads(ctx, q, k, v, key_padding_mask, do) + (None, None, None)
        b, h, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        cdt = _compute_dtype(q.dtype)
        k3 = k.to(cdt).contiguous().view(b * hk, tk, d)
        v3 = v.to(cdt).contiguous().view(b * hk, tk, d)
        dq = torch.empty((b, h, tq, d), dtype=q.dtype, device=q.device)
        dk3 = torch.zeros((b * hk, tk, d), dtype=cdt, device=q.device)
        dv3 = torch.zeros((b * hk, tk, d), dtype=cdt, device=q.device)
        bufs = _Buffers(cdt, q.device)
        step = _rows_per_chunk(b, h, tq, tk, q.device)
        for i0 in range(0, tq, step):
            c = _Chunk(q, k3.view(b, hk, tk, d), i0, min(tq, i0 + step), causal, key_padding_mask, scale, bufs)
            if c.stop == 0:
                dq[:, :, c.i0 : c.i1].zero_()
                continue
            rows = c.g * c.rows
            p = c.relu_scores(k3, bufs.get("s", b * hk, rows, c.stop))
            do3 = bufs.get("do", b, h, c.rows, d)
            do3 = do3.copy_(do[:, :, c.i0 : c.i1]).view(b * hk, rows, d)
            dv3[:, : c.stop].baddbmm_(p.transpose(1, 2), do3)
            ds = torch.bmm(do3, v3[:, : c.stop].transpose(1, 2), out=bufs.get("ds", b * hk, rows, c.stop))
            torch.ops.aten.threshold_backward.grad_input(ds, p, 0.0, grad_input=ds)  # dS = dP 1[S > 0]
            dq_c = torch.bmm(ds, k3[:, : c.stop], out=bufs.get("o", b * hk, rows, d)).mul_(scale)
            dq[:, :, c.i0 : c.i1].copy_(c.heads(dq_c))
            dk3[:, : c.stop].baddbmm_(ds.transpose(1, 2), c.q3)  # q3 already carries the scale
        dk = dk3.view(b, hk, tk, d).to(k.dtype)
        dv = dv3.view(b, hk, tk, d).to(v.dtype)
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
