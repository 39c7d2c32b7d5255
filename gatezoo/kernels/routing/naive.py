"""Readable compositions of the routing ops: the oracles of the tests and what ``torch.compile``
traces. Shapes: N tokens, E experts, k choices per token, M = N * k assignments.

* :func:`route_composed` - top-k routing of router logits: selection scores
  ``s = (logits + noise) * scale + bias``, the k largest per row (ties: lower expert first), and
  weights ``softmax`` over the k selected entries of ``(logits + noise) * scale`` (the selection
  bias picks experts but never enters the weights, as in auxiliary-loss-free balancing).
* :func:`plan_composed` - the dispatch plan: assignments sorted by expert, the capacity rule.
* :func:`permute_composed`, :func:`unpermute_composed` - gather rows into expert order and the
  weighted sum back to tokens.
* :func:`grouped_mm_composed` - one matmul per expert on its contiguous slice of rows.
* :func:`expert_ffn_composed` - the experts' whole feed-forward from these ops: permute, first
  projection, activation, second projection, weighted un-permute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..activation.naive import phi_defined


class Routing(NamedTuple):
    """What :func:`~gatezoo.kernels.routing.route` returns.

    weights: (N, k) float32, each row sums to 1 (softmax over the selected logits).
    indices: (N, k) int64 expert ids, by descending selection score.
    counts: (E,) int64, how many tokens chose each expert (the load before any capacity).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor


class DispatchPlan(NamedTuple):
    """Where every (token, choice) assignment goes; built by :func:`~gatezoo.kernels.routing.make_plan`.

    Assignment ``m = n * k + j`` is token n's j-th choice ``indices[n, j]``.

    order: (M',) int64, the kept assignments sorted by expert (stable: by m within an expert).
    token: (M',) int64, ``order // k``: the token each sorted row comes from.
    offsets: (E + 1,) int64, expert e owns sorted rows ``offsets[e]:offsets[e + 1]``.
    position: (N, k) int64, the sorted row of each assignment, -1 where it was dropped.
    counts: (E,) int64, rows per expert after the capacity (``offsets.diff()``).
    dropped: () int64, the number of assignments dropped by the capacity or masked out.
    """

    order: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    position: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor


def route_composed(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, scale: float = 1.0) -> Routing:
    """Top-k routing, computed in float32 (see the module docstring for the definition)."""
    num_experts = logits.shape[-1]
    z = logits.float()
    if noise is not None:
        z = z + noise.float()
    z = z * scale
    score = z if bias is None else z + bias.float()
    # a stable descending sort gives "ties: lower expert first"
    indices = torch.sort(score.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    weights = torch.softmax(torch.gather(z, -1, indices), dim=-1)
    counts = torch.bincount(indices.flatten(), minlength=num_experts)
    return Routing(weights, indices, counts)


def plan_composed(indices: torch.Tensor, num_experts: int, capacity: int | None = None,
                  keep: torch.Tensor | None = None) -> DispatchPlan:
    """The dispatch plan of ``indices`` (N, k).

    ``keep`` (N, k) bool masks assignments out before anything else (a router that gives some
    choices weight 0, for instance). ``capacity`` caps the rows of every expert: its assignments
    are ranked by choice slot first (every token's first choice before any second choice), then
    by token index, and those past ``capacity`` are dropped. A dropped assignment contributes
    nothing to the output (its weight is not handed to the other choices).
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    kept = torch.ones_like(flat, dtype=torch.bool) if keep is None else keep.reshape(-1).clone()
    if capacity is not None:
        # rank by (slot, token): list the assignments slot-major (entry j * n + t is assignment
        # t * k + j), stable-sort them by expert (the masked ones last), and an entry's rank is
        # its place in the sorted list minus where its expert's group starts: O(M log M)
        slot_major = indices.t().reshape(-1)
        alive = kept.view(n, k).t().reshape(-1)
        group = torch.where(alive, slot_major, torch.full_like(slot_major, num_experts))
        sorted_group, perm = torch.sort(group, stable=True)
        sizes = torch.bincount(group, minlength=num_experts + 1)
        starts = sizes.cumsum(0) - sizes
        rank = torch.arange(group.numel(), device=group.device) - starts[sorted_group]
        over = torch.zeros_like(alive)
        over[perm] = (rank >= capacity) & (sorted_group < num_experts)
        kept = kept & ~over.view(k, n).t().reshape(-1)
    sortable = torch.where(kept, flat, torch.full_like(flat, num_experts))  # dropped ones sort last
    order = torch.sort(sortable, stable=True).indices[: int(kept.sum())]
    counts = torch.bincount(flat[order], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = counts.cumsum(0)
    position = torch.full((n * k,), -1, dtype=torch.int64, device=indices.device)
    position[order] = torch.arange(order.numel(), device=indices.device)
    return DispatchPlan(order, order // k, offsets, position.view(n, k), counts,
                        (~kept).sum())


def permute_composed(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows of ``x`` (N, d) in expert order: ``x[plan.token]`` (M', d)."""
    return x[plan.token]


def unpermute_composed(y: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``out[n] = sum_j weights[n, j] * y[position[n, j]]`` over the kept assignments; out (N, d)
    in ``y``'s dtype (the products are taken in float32)."""
    kept = plan.position >= 0
    # a zero row after y's rows stands in for the dropped assignments (y may have no rows at all)
    padded = torch.cat([y.float(), y.new_zeros((1, y.shape[1]), dtype=torch.float32)])
    rows = padded[torch.where(kept, plan.position, y.shape[0])]  # (N, k, d)
    w = torch.where(kept, weights.float(), torch.zeros((), device=weights.device))
    return (w[..., None] * rows).sum(1).to(y.dtype)


def grouped_mm_composed(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ weight[e]``; x (M, K),
    weight (E, K, N), out (M, N). Rows past ``offsets[-1]`` are left zero."""
    bounds = offsets.tolist()
    parts = [x[bounds[e]:bounds[e + 1]] @ weight[e] for e in range(weight.shape[0])]
    return torch.cat(parts + [x.new_zeros(x.shape[0] - bounds[-1], weight.shape[-1])], 0)


def _row_experts(plan: DispatchPlan, num_experts: int) -> torch.Tensor:
    """The expert of every sorted row (M',)."""
    return torch.repeat_interleave(torch.arange(num_experts, device=plan.counts.device), plan.counts,
                                   output_size=plan.order.numel())


def expert_ffn_composed(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                        plan: DispatchPlan, spec, glu: bool, alpha: torch.Tensor | None = None,
                        b1: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' feed-forward of a MoE layer, op by op::

        xs = x[plan.token]                                  # rows in expert order
        h  = xs @ w1[e] + b1[e]                             # per expert, on its slice
        a  = phi(h[:, :H]) * h[:, H:]  (glu)  or  phi(h)    # spec: a row of the activation table
        ys = a @ w2[e] + b2[e]
        out[n] = sum_j weights[n, j] * ys[position[n, j]]   # over the kept assignments

    x (N, d), w1 (E, d, 2H or H), w2 (E, H, d_out), weights (N, k); out (N, d_out) in x's dtype.
    """
    num_experts = w1.shape[0]
    h = grouped_mm_composed(permute_composed(x, plan), w1, plan.offsets)
    rows = _row_experts(plan, num_experts) if b1 is not None or b2 is not None else None
    if b1 is not None:
        h = h + b1[rows]
    if glu:
        half = h.shape[1] // 2
        a = phi_defined(h[:, :half], spec, alpha) * h[:, half:]
    else:
        a = phi_defined(h, spec, alpha)
    ys = grouped_mm_composed(a, w2, plan.offsets)
    if b2 is not None:
        ys = ys + b2[rows]
    return unpermute_composed(ys, weights, plan)
