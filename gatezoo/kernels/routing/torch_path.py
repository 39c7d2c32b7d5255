"""The torch backend of the routing ops (the definitions are in :mod:`.naive`).

* :func:`route_torch` - ``torch.topk`` over an order-preserving int64 encoding of the selection
  scores, so that ties pick the lower expert first exactly as the stable sort of
  :func:`~.naive.route_composed` does (``torch.topk`` on the float scores breaks ties in no
  documented order: on all-zero logits, as from a zero-initialised router, it picks the highest
  experts). :class:`RouteFunction` saves the (N, k) weights and indices it computed plus its
  inputs ``logits``, ``bias`` and ``noise`` (not copied, but kept alive until the backward: the
  first-order backward uses only the weights and indices and the logits' shape and dtype, the
  inputs serve the double backward); the logits' gradient is scattered into the k selected
  columns.
* :func:`permute_torch` - ``index_select``; autograd's own backward of it is the ``index_add``
  of the sorted rows' gradients back to their tokens, saving only the index.
* :func:`unpermute_torch` - :class:`UnpermuteFunction`: an ``index_add`` of the weighted sorted
  rows into a float32 (N, d) output. Backward works row by sorted row: ``dy[i] = w * dout[token[i]]``
  (every sorted row has exactly one assignment) and ``dw = <dout[token[i]], y[i]>``.
* :func:`grouped_mm_torch` - :class:`GroupedMMFunction`: one ``torch.mm`` per expert on its
  contiguous slice, written into a preallocated output; saves only its inputs.

No dense E x N masks or one-hot tensors anywhere. Second-order gradients differentiate the
compositions of :mod:`.naive` (:func:`~gatezoo.kernels.backend.composed_grads`).
"""

from __future__ import annotations

import torch

from ..backend import composed_grads
from .naive import (
    DispatchPlan,
    Routing,
    grouped_mm_composed,
    route_composed,
    unpermute_composed,
)


def _route_weights(logits, k, bias, noise, scale):
    return route_composed(logits, k, bias, noise, scale).weights


def topk_lower_first(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (N, k) of the k largest entries of each row of float32 ``score``, by descending
    value, ties to the lower column: ``torch.topk`` over unique int64 keys (the float's
    order-preserving integer image in the high 32 bits, the reversed column in the low 32)."""
    num = score.shape[-1]
    bits = (score + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (they tie, as in a sort)
    mono = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # int order == float order
    rev = torch.arange(num - 1, -1, -1, device=score.device)
    return torch.topk(mono * (1 << 32) + rev, k, dim=-1, sorted=True).indices


def route_backward(weights: torch.Tensor, indices: torch.Tensor, dweights: torch.Tensor, num_experts: int,
                   scale: float, dtype: torch.dtype) -> torch.Tensor:
    """d logits (N, E) from d weights: ``scale * w_j (dw_j - sum_i w_i dw_i)`` at the selected
    columns, zero elsewhere."""
    dw = dweights.float()
    g = weights * (dw - (weights * dw).sum(-1, keepdim=True)) * scale
    out = torch.zeros((weights.shape[0], num_experts), dtype=torch.float32, device=weights.device)
    return out.scatter_(1, indices, g).to(dtype)


class RouteFunction(torch.autograd.Function):
    """Top-k routing; returns (weights, indices, counts), only the weights differentiable (with
    respect to the logits and the noise). Saves ``logits``, ``bias``, ``noise`` (its inputs, for
    the double backward through the composition) and the computed ``weights`` and ``indices``
    (for the lean first-order backward)."""

    @staticmethod
    def forward(ctx, logits, k: int, bias, noise, scale: float):
        z = logits.float()
        if noise is not None:
            z = z + noise.float()
        z = z * scale
        score = z if bias is None else z + bias.float()
        indices = topk_lower_first(score, k)
        del score
        weights = torch.softmax(torch.gather(z, 1, indices), dim=-1)
        counts = torch.bincount(indices.flatten(), minlength=logits.shape[1])
        ctx.k, ctx.scale = k, scale
        ctx.save_for_backward(logits, bias, noise, weights, indices)
        ctx.mark_non_differentiable(indices, counts)
        return weights, indices, counts

    @staticmethod
    def backward(ctx, dweights, _dindices, _dcounts):
        logits, bias, noise, weights, indices = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, _route_weights, (logits, ctx.k, bias, noise, ctx.scale), dweights)
        dl = route_backward(weights, indices, dweights, logits.shape[1], ctx.scale, logits.dtype)
        dnoise = dl.to(noise.dtype) if noise is not None and ctx.needs_input_grad[3] else None
        return (dl if ctx.needs_input_grad[0] else None), None, None, dnoise, None


def route_torch(logits, k: int, bias=None, noise=None, scale: float = 1.0) -> Routing:
    """:func:`~.naive.route_composed` with a lean backward and ``topk`` selection."""
    return Routing(*RouteFunction.apply(logits, k, bias, noise, scale))


def permute_torch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``x[plan.token]``; its backward is autograd's ``index_add`` (nothing but the index saved)."""
    return x.index_select(0, plan.token)


def _sorted_weights(weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The weight of every sorted row, float32 (M',)."""
    return weights.float().reshape(-1).index_select(0, plan.order)


class UnpermuteFunction(torch.autograd.Function):
    """``out[n] = sum_j w[n, j] y[position[n, j]]`` over the kept assignments, float32 sums."""

    @staticmethod
    def forward(ctx, y, weights, plan: DispatchPlan):
        n, d = plan.position.shape[0], y.shape[1]
        ws = _sorted_weights(weights, plan)
        out = torch.zeros((n, d), dtype=torch.float32, device=y.device)
        out.index_add_(0, plan.token, y.float() * ws[:, None])
        ctx.plan = plan
        ctx.save_for_backward(y, weights)
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, dout):
        y, weights = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composition instead
            return composed_grads(ctx, unpermute_composed, (y, weights, plan), dout)
        g = dout.index_select(0, plan.token).float()  # (M', d): each sorted row's token's dout
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy = (g * _sorted_weights(weights, plan)[:, None]).to(y.dtype)
        if ctx.needs_input_grad[1]:
            flat = torch.zeros(weights.numel(), dtype=torch.float32, device=weights.device)
            flat.index_copy_(0, plan.order, (g * y.float()).sum(-1))
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
