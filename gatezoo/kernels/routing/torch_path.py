"""The torch backend of the routing ops (the definitions are in :mod:`.naive`).

* :func:`route_torch` - ties pick the lower expert first exactly as the stable sort of
  :func:`~.naive.route_composed` does (``torch.topk`` on the float scores breaks ties in no
  documented order: on all-zero logits, as from a zero-initialised router, it picks the highest
  experts): a float ``torch.topk`` of k + 1 decides the rows without ties or NaN, an
  order-preserving int64 encoding of the scores the others (:func:`topk_lower_first`).
  :class:`RouteFunction` saves the (N, k) weights and indices it computed plus its
  inputs ``logits``, ``bias`` and ``noise`` (not copied, but kept alive until the backward: the
  first-order backward uses only the weights and indices and the logits' shape and dtype, plus
  the selected logits for sigmoid scores; the inputs serve the double backward); the logits'
  gradient is scattered into the k selected columns.
* :func:`permute_torch` - ``index_select``; autograd's own backward of it is the ``index_add``
  of the sorted rows' gradients back to their tokens, saving only the index.
* :func:`unpermute_torch` - :class:`UnpermuteFunction`: an ``index_add`` of the weighted sorted
  rows into a float32 (N, d) output. Backward works row by sorted row: ``dy[i] = w * dout[token[i]]``
  (every sorted row has exactly one assignment) and ``dw = <dout[token[i]], y[i]>``.
* :func:`grouped_mm_torch` - :class:`GroupedMMFunction`: one ``torch.mm`` per expert on its
  contiguous slice, written into a preallocated output; saves only its inputs.
* :func:`expert_ffn_torch` - :class:`ExpertFFNFunction`: the experts' whole feed-forward
  (permute, projection, activation, projection, weighted un-permute) block by block of experts
  while the block is in cache; saves only the pre-activation.

No dense E x N masks or one-hot tensors anywhere. Second-order gradients differentiate the
compositions of :mod:`.naive` (:func:`~gatezoo.kernels.backend.composed_grads`).
"""

from __future__ import annotations

import torch

from ..activation.torch_path import _backward_chunks, _compute_dtype, _forward_chunks
from ..backend import composed_grads
from ..scratch import Scratch
from .naive import (
    DispatchPlan,
    Routing,
    expert_ffn_composed,
    gate_weights,
    grouped_mm_composed,
    route_composed,
    selection_scores,
    sigmoid_factor,
    unpermute_composed,
)


def _route_weights(logits, k, bias, noise, scale, score, bias_on):
    return route_composed(logits, k, bias, noise, scale, score, bias_on).weights



def _topk_exact(score: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_lower_first` on every row: ``torch.topk`` over unique int64 keys (the float's
    order-preserving integer image in the high 32 bits, the reversed column in the low 32)."""
    num = score.shape[-1]
    bits = (score + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (they tie, as in a sort)
    mono = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # int order == float order
    rev = torch.arange(num - 1, -1, -1, device=score.device)
    return torch.topk(mono * (1 << 32) + rev, k, dim=-1, sorted=True).indices


def topk_lower_first(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (N, k) of the k largest entries of each row of float32 ``score``, by descending
    value, ties to the lower column (NaN with the sign bit clear above everything, with it set
    below everything, as their bits order them).

    A plain ``torch.topk`` of k + 1 on the floats decides every row whose k + 1 largest values
    are distinct and not NaN (ties and NaN are what its order leaves open, and a tie at the k-th
    place shows as equal neighbours among the k + 1); the other rows, rare with real-valued
    logits, go through the exact int64 keys of :func:`_topk_exact`."""
    num = score.shape[-1]
    if k >= num:
        return _topk_exact(score, k)
    vals, idx = torch.topk(score, k + 1, dim=-1, sorted=True)
    open_rows = (vals[:, 1:] == vals[:, :-1]).any(-1) | vals.isnan().any(-1)
    idx = idx[:, :k]
    rows = open_rows.nonzero().squeeze(1)
    if rows.numel():
        idx = idx.clone()
        idx[rows] = _topk_exact(score.index_select(0, rows), k)
    return idx


def route_backward(weights: torch.Tensor, indices: torch.Tensor, dweights: torch.Tensor, num_experts: int,
                   scale: float, dtype: torch.dtype, factor: torch.Tensor | None = None) -> torch.Tensor:
    """d logits (N, E) from d weights: ``scale * w_j (dw_j - sum_i w_i dw_i)`` at the selected
    columns (times ``factor`` (N, k), ``1 - sigmoid(z_j)``, for sigmoid scores), zero elsewhere."""
    dw = dweights.float()
    g = weights * (dw - (weights * dw).sum(-1, keepdim=True)) * scale
    if factor is not None:
        g = g * factor
    out = torch.zeros((weights.shape[0], num_experts), dtype=torch.float32, device=weights.device)
    return out.scatter_(1, indices, g).to(dtype)


class RouteFunction(torch.autograd.Function):
    """Top-k routing; returns (weights, indices, counts), only the weights differentiable (with
    respect to the logits and the noise). Saves ``logits``, ``bias``, ``noise`` (its inputs, for
    the double backward through the composition and, with sigmoid scores, the selected logits'
    sigmoid) and the computed ``weights`` and ``indices`` (for the lean first-order backward)."""

    @staticmethod
    def forward(ctx, logits, k: int, bias, noise, scale: float, score: str, bias_on: str):
        z = logits.float()
        if noise is not None:
            z = z + noise.float()
        z = z * scale
        sel = selection_scores(z, bias, score, bias_on)
        indices = topk_lower_first(sel, k)
        bad = sel.isnan().any(-1, keepdim=True)
        del sel
        weights = gate_weights(torch.gather(z, 1, indices), score).masked_fill_(bad, float("nan"))
        counts = torch.bincount(indices.flatten(), minlength=logits.shape[1])
        ctx.k, ctx.scale, ctx.score, ctx.bias_on = k, scale, score, bias_on
        ctx.save_for_backward(logits, bias, noise, weights, indices)
        ctx.mark_non_differentiable(indices, counts)
        return weights, indices, counts

    @staticmethod
    def backward(ctx, dweights, _dindices, _dcounts):
        logits, bias, noise, weights, indices = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            args = (logits, ctx.k, bias, noise, ctx.scale, ctx.score, ctx.bias_on)
            return composed_grads(ctx, _route_weights, args, dweights)
        factor = sigmoid_factor(logits, noise, ctx.scale, indices) if ctx.score == "sigmoid" else None
        dl = route_backward(weights, indices, dweights, logits.shape[1], ctx.scale, logits.dtype, factor)
        dnoise = dl.to(noise.dtype) if noise is not None and ctx.needs_input_grad[3] else None
        return (dl if ctx.needs_input_grad[0] else None), None, None, dnoise, None, None, None


def route_torch(logits, k: int, bias=None, noise=None, scale: float = 1.0, score: str = "softmax",
                bias_on: str = "scores") -> Routing:
    """:func:`~.naive.route_composed` with a lean backward and ``topk`` selection."""
    return Routing(*RouteFunction.apply(logits, k, bias, noise, scale, score, bias_on))


def permute_torch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``x[plan.token]``; its backward is autograd's ``index_add`` (nothing but the index saved)."""
    return x.index_select(0, plan.token)


def _sorted_weights(weights: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of every sorted row, in ``dtype`` (M',)."""
    return weights.to(dtype).reshape(-1).index_select(0, plan.order)


class UnpermuteFunction(torch.autograd.Function):
    """``out[n] = sum_j w[n, j] y[position[n, j]]`` over the kept assignments, summed in float32
    (float64 for float64 ``y``)."""

    @staticmethod
    def forward(ctx, y, weights, plan: DispatchPlan):
        n, d = plan.position.shape[0], y.shape[1]
        acc = _compute_dtype(y.dtype)
        ws = _sorted_weights(weights, plan, acc)
        out = torch.zeros((n, d), dtype=acc, device=y.device)
        out.index_add_(0, plan.token, y.to(acc) * ws[:, None])
        ctx.plan = plan
        ctx.save_for_backward(y, weights)
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, dout):
        y, weights = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, unpermute_composed, (y, weights, plan), dout)
        acc = _compute_dtype(y.dtype)
        g = dout.index_select(0, plan.token).to(acc)  # (M', d): each sorted row's token's dout
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy = (g * _sorted_weights(weights, plan, acc)[:, None]).to(y.dtype)
        if ctx.needs_input_grad[1]:
            flat = torch.zeros(weights.numel(), dtype=acc, device=weights.device)
            flat.index_copy_(0, plan.order, (g * y.to(acc)).sum(-1))
            dw = flat.view(weights.shape).to(weights.dtype)
        return dy, dw, None


def unpermute_torch(y: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """:func:`~.naive.unpermute_composed` as one lean autograd node."""
    return UnpermuteFunction.apply(y, weights, plan)


class GroupedMMFunction(torch.autograd.Function):
    """One matmul per expert on its contiguous rows; rows past ``offsets[-1]`` give zero rows and
    get zero gradient, an expert without rows gets a zero weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        bounds = offsets.tolist()
        out = torch.empty((x.shape[0], weight.shape[2]), dtype=x.dtype, device=x.device)
        for e in range(weight.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                torch.mm(x[lo:hi], weight[e], out=out[lo:hi])
        out[bounds[-1]:].zero_()
        ctx.bounds = bounds
        ctx.save_for_backward(x, weight, offsets)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, offsets = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, grouped_mm_composed, (x, weight, offsets), dy)
        bounds = ctx.bounds
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty((x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
            for e in range(weight.shape[0]):
                lo, hi = bounds[e], bounds[e + 1]
                if hi > lo:
                    torch.mm(dy[lo:hi], weight[e].t(), out=dx[lo:hi])
            dx[bounds[-1]:].zero_()
        if ctx.needs_input_grad[1]:
            dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            for e in range(weight.shape[0]):
                lo, hi = bounds[e], bounds[e + 1]
                if hi > lo:
                    torch.mm(x[lo:hi].t(), dy[lo:hi], out=dw[e])
                else:
                    dw[e].zero_()
        return dx, dw, None


def grouped_mm_torch(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`~.naive.grouped_mm_composed` with per-expert ``torch.mm`` into one output buffer."""
    return GroupedMMFunction.apply(x, weight, offsets)


# Sorted rows per block of the fused expert feed-forward: about 2^20 elements of the widest
# hidden tensor, so that one block's temporaries stay in cache between its steps.
FFN_BLOCK_ELEMENTS = 1 << 20


def expert_blocks(bounds: list[int], width: int) -> list[tuple[int, int, list[int], list[int]]]:
    """Consecutive experts grouped into blocks of about ``FFN_BLOCK_ELEMENTS / width`` sorted rows:
    ``[(lo, hi, experts, rows), ...]``, the block's rows ``lo:hi`` split into ``rows[i]`` rows of
    expert ``experts[i]`` (experts without rows left out). An expert with more rows than the
    target is a block of its own."""
    target = max(1, FFN_BLOCK_ELEMENTS // max(width, 1))
    blocks, experts, rows, start = [], [], [], bounds[0]
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            experts.append(e)
            rows.append(hi - lo)
        if hi - start >= target:
            blocks.append((start, hi, experts, rows))
            experts, rows, start = [], [], hi
    if experts:
        blocks.append((start, bounds[-1], experts, rows))
    return blocks


def _ffn_in_forward_order(x, w1, w2, weights, alpha, b1, b2, plan, spec, glu):
    return expert_ffn_composed(x, w1, w2, weights, plan, spec, glu, alpha, b1, b2)


def _project(inp: torch.Tensor, weights, biases, experts, rows, out: torch.Tensor) -> None:
    """``out[rows of e] = inp[rows of e] @ weights[e] (+ biases[e])`` for every expert of a block
    (``weights``, ``biases``: per-expert sequences, from ``unbind``)."""
    for e, i, o in zip(experts, inp.split(rows), out.split(rows)):
        if biases is None:
            torch.mm(i, weights[e], out=o)
        else:
            torch.addmm(biases[e], i, weights[e], out=o)


def ffn_blocks_forward(x, w1s, w2s, b1s, b2s, ws, token, blocks, spec, glu: bool, alpha, out, *,
                       keep: bool = False) -> list[torch.Tensor]:
    """The forward loop of :class:`ExpertFFNFunction` over ``blocks`` (from :func:`expert_blocks`):
    for each block, gather its tokens' rows of ``x``, both projections of its experts with the
    activation between, the sorted combine weights ``ws`` and an ``index_add`` into ``out``
    (N, d_out), in the accumulation dtype. ``w1s``, ``w2s`` (and ``b1s``, ``b2s`` or None) are
    indexed by expert id, so any sequence holding the blocks' experts serves (the expert
    offloading of :mod:`gatezoo.models.offload` passes its cache slots). Returns the
    pre-activations of the blocks when ``keep`` (for backward), else an empty list. Calling it
    on consecutive runs of the blocks adds the same terms in the same order as one call."""
    d, acc = x.shape[1], out.dtype
    hs: list[torch.Tensor] = []
    bufs, act_scratch = Scratch(x.dtype, x.device), Scratch(acc, x.device)
    for lo, hi, experts, rows in blocks:
        w1 = w1s[experts[0]]
        width, hid, d_out = w1.shape[1], w2s[experts[0]].shape[0], w2s[experts[0]].shape[1]
        tok, m = token[lo:hi], hi - lo
        xs = torch.index_select(x, 0, tok, out=bufs.get("x", m, d))
        if keep:
            h = torch.empty((m, width), dtype=x.dtype, device=x.device)
            hs.append(h)
        else:  # nothing will call backward: h can live in the scratch too
            h = bufs.get("h", m, width)
        _project(xs, w1s, b1s, experts, rows, h)
        a = bufs.get("a", m, hid)
        if glu:
            _forward_chunks(h[:, :hid], h[:, hid:], a, spec, alpha, act_scratch)
        else:
            _forward_chunks(h, None, a, spec, alpha, act_scratch)
        y = bufs.get("y", m, d_out)
        _project(a, w2s, b2s, experts, rows, y)
        yw = y.mul_(ws[lo:hi, None]) if acc == x.dtype else y.to(acc).mul_(ws[lo:hi, None])
        out.index_add_(0, tok, yw)
    return hs


class ExpertFFNFunction(torch.autograd.Function):
    """The experts' feed-forward (:func:`~.naive.expert_ffn_composed`) fused on blocks of rows.

    The sorted rows are walked in blocks of consecutive experts (:func:`expert_blocks`, a few MiB
    each; with few experts a block is one expert's slice). On each block: gather its tokens' rows,
    the first projection of every expert into the block's pre-activation ``h`` (kept for
    backward), the activation, the second projection, the combine weights, and an ``index_add``
    into the output. Each step reads what the last one left in cache, so the gathered inputs,
    the activations and the expert outputs never travel to main memory as (M, .) tensors, and none
    of them is saved: backward gathers the inputs again and recomputes the activation from ``h``,
    the one saved tensor of the hidden layer's size. ``h`` is kept as one tensor per block, not
    one (M', 2H) tensor: an allocation that large is mapped fresh from the OS on every call, and
    its page faults cost as much as a matmul here.

    Backward per block, with ``g`` the gathered output gradients and ``w`` the combine weights:
    ``ga = g @ w2ᵀ``; ``dw = <ga, a> + <g, b2>``; ``dw2 = aᵀ (w g)``; ``da = w ga``;
    ``dh = phi-backward(h, da)``; ``dw1 = xsᵀ dh``; ``dx[token] += dh @ w1ᵀ`` (matmuls per expert).
    """

    @staticmethod
    def forward(ctx, x, w1, w2, weights, alpha, b1, b2, plan: DispatchPlan, spec, glu: bool):
        bounds = plan.offsets.tolist()
        n, width, d_out = x.shape[0], w1.shape[2], w2.shape[2]
        acc = _compute_dtype(x.dtype)  # where sums over tokens accumulate
        al = None if alpha is None else float(alpha)
        ws = weights.to(acc).reshape(-1).index_select(0, plan.order)
        out = torch.zeros((n, d_out), dtype=acc, device=x.device)
        blocks = expert_blocks(bounds, width)
        b1s, b2s = (None if b is None else b.unbind(0) for b in (b1, b2))
        hs = ffn_blocks_forward(x, w1.unbind(0), w2.unbind(0), b1s, b2s, ws, plan.token, blocks, spec, glu, al, out,
                                keep=any(ctx.needs_input_grad))
        ctx.plan, ctx.spec, ctx.glu, ctx.alpha, ctx.blocks = plan, spec, glu, al, blocks
        ctx.alpha_like = None if alpha is None else (alpha.dtype, alpha.shape)
        ctx.save_for_backward(x, w1, w2, weights, alpha, b1, b2, *hs)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, weights, alpha, b1, b2, *hs = ctx.saved_tensors
        plan, spec, glu, al = ctx.plan, ctx.spec, ctx.glu, ctx.alpha
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, _ffn_in_forward_order, (x, w1, w2, weights, alpha, b1, b2, plan, spec, glu),
                                  dout)
        need = ctx.needs_input_grad
        n, d = x.shape
        num_experts, width, hid, d_out = w1.shape[0], w1.shape[2], w2.shape[1], w2.shape[2]
        acc = _compute_dtype(x.dtype)  # where sums over tokens accumulate
        ws = weights.to(acc).reshape(-1).index_select(0, plan.order)
        dout = dout.to(x.dtype)
        dx = torch.zeros((n, d), dtype=acc, device=x.device) if need[0] else None
        dw1 = torch.empty_like(w1) if need[1] else None
        dw2 = torch.empty_like(w2) if need[2] else None
        dws = torch.zeros(ws.shape, dtype=acc, device=x.device) if need[3] else None
        want_alpha = alpha is not None and need[4]
        db1 = torch.empty_like(b1) if b1 is not None and need[5] else None
        db2 = torch.empty_like(b2) if b2 is not None and need[6] else None
        busy = {e for _, _, experts, _ in ctx.blocks for e in experts}
        idle = [e for e in range(num_experts) if e not in busy]
        for grad in (dw1, dw2, db1, db2):  # experts without rows get zero gradients
            if grad is not None and idle:
                grad[idle] = 0
        w1s, w2s = w1.unbind(0), w2.unbind(0)
        b2s = None if b2 is None else b2.unbind(0)
        dw1s, dw2s = (None if t is None else t.unbind(0) for t in (dw1, dw2))
        need_dh = need[0] or need[1] or want_alpha or db1 is not None
        bufs, act_scratch = Scratch(x.dtype, x.device), Scratch(acc, x.device)
        partials = []
        for (lo, hi, experts, rows), h in zip(ctx.blocks, hs):
            tok, m, wcol = plan.token[lo:hi], hi - lo, ws[lo:hi, None]
            g = torch.index_select(dout, 0, tok, out=bufs.get("g", m, d_out))
            # the activation, recomputed from the saved h: phi once, kept for the gate's gradient
            phi = bufs.get("phi", m, hid)
            _forward_chunks(h[:, :hid] if glu else h, None, phi, spec, al, act_scratch)
            a = torch.mul(phi, h[:, hid:], out=bufs.get("a", m, hid)) if glu else phi
            ga = bufs.get("ga", m, hid)  # dL/da before the combine weight
            g_e, ga_e, a_e = g.split(rows), ga.split(rows), a.split(rows)
            for e, ge, gae in zip(experts, g_e, ga_e):
                torch.mm(ge, w2s[e].t(), out=gae)
            if dws is not None:
                dot = torch.mul(ga, a, out=bufs.get("t", m, hid)).sum(-1, dtype=acc)
                if b2 is not None:
                    for e, ge, dote in zip(experts, g_e, dot.split(rows)):
                        dote += torch.mv(ge, b2s[e]).to(acc)
                dws[lo:hi] = dot
            g.mul_(wcol.to(g.dtype))  # dL/dy of the block's rows
            for e, ge, ae in zip(experts, g_e, a_e):
                if dw2 is not None:
                    torch.mm(ae.t(), ge, out=dw2s[e])
                if db2 is not None:
                    db2[e] = ge.sum(0, dtype=acc)
            if not need_dh:
                continue
            ga.mul_(wcol.to(ga.dtype))  # dL/da
            dh = bufs.get("dh", m, width)
            if glu:  # d b = da * phi; d a-half = phi'(a-half) * da * b (phi not recomputed: db=None)
                torch.mul(ga, phi, out=dh[:, hid:])
                dal = _backward_chunks(h[:, :hid], h[:, hid:], ga, dh[:, :hid], None, spec, al, want_alpha,
                                       act_scratch)
            else:
                dal = _backward_chunks(h, None, ga, dh, None, spec, al, want_alpha, act_scratch)
            if dal is not None:
                partials.append(dal)
            dh_e = dh.split(rows)
            if dw1 is not None:
                xs = torch.index_select(x, 0, tok, out=bufs.get("x", m, d))
                for e, xe, dhe in zip(experts, xs.split(rows), dh_e):
                    torch.mm(xe.t(), dhe, out=dw1s[e])
            if db1 is not None:
                for e, dhe in zip(experts, dh_e):
                    db1[e] = dhe.sum(0, dtype=acc)
            if dx is not None:
                dxs = bufs.get("dx", m, d)
                for e, dhe, dxe in zip(experts, dh_e, dxs.split(rows)):
                    torch.mm(dhe, w1s[e].t(), out=dxe)
                dx.index_add_(0, tok, dxs if acc == x.dtype else dxs.to(acc))
        dweights = None
        if dws is not None:
            flat = torch.zeros(weights.numel(), dtype=acc, device=x.device)
            flat.index_copy_(0, plan.order, dws)
            dweights = flat.view(weights.shape).to(weights.dtype)
        dalpha = None
        if want_alpha:
            dtype, shape = ctx.alpha_like
            total = torch.stack(partials).sum() if partials else torch.zeros((), dtype=torch.float64)
            dalpha = total.to(dtype=dtype, device=x.device).reshape(shape)
        return (None if dx is None else dx.to(x.dtype), dw1, dw2, dweights, dalpha, db1, db2, None, None, None)


def expert_ffn_torch(x, w1, w2, weights, plan: DispatchPlan, spec, glu: bool, alpha=None, b1=None, b2=None):
    """:func:`~.naive.expert_ffn_composed` as one lean autograd node (:class:`ExpertFFNFunction`)."""
    return ExpertFFNFunction.apply(x, w1, w2, weights, alpha, b1, b2, plan, spec, glu)
