"""Readable compositions of the routing ops: the oracles of the tests and what ``torch.compile``
traces. Shapes: N tokens, E experts, k choices per token, M = N * k assignments.

* :func:`route_composed` - top-k routing of router logits ``z = (logits + noise) * scale``.
  The router's affinity scores are ``s = softmax(z)`` (``score="softmax"``) or ``s = sigmoid(z)``
  (``score="sigmoid"``). Selection: the k largest per row (ties: lower expert first) of ``s + bias``
  (``bias_on="scores"``, DeepSeek-V3's auxiliary-loss-free balancing, eq. 16), of ``z + bias``
  (``bias_on="logits"``, the older rule) or of ``z`` without a bias (the same experts as ``s``:
  both scores are increasing in z). Weights: the selected scores renormalised to sum 1,
  ``s_i / sum_{j in S} s_j``, computed as ``softmax`` over the k selected entries of ``z``
  (softmax scores) or of ``log sigmoid(z)`` (sigmoid scores): the bias picks experts but never
  enters the weights. A row with a NaN selection score (a NaN logit or bias, or a softmax row
  made NaN by a NaN or +inf logit) gets NaN weights.
* :func:`plan_composed` - the dispatch plan: assignments sorted by expert, the capacity rule.
* :func:`permute_composed`, :func:`unpermute_composed` - gather rows into expert order and the
  weighted sum back to tokens.
* :func:`grouped_mm_composed` - one matmul per expert on its contiguous slice of rows.
* :func:`expert_ffn_composed` - the experts' whole feed-forward from these ops: permute, first
  projection, activation, second projection, weighted un-permute.

Under a ``torch.compile`` or ``torch.export`` trace (``torch.compiler.is_compiling()``) every
shape must follow from the input shapes, never from routing decisions, or the trace breaks:

* :func:`plan_composed` keeps all N * k assignments in ``order`` (the dropped ones after the
  kept ones, past ``offsets[-1]``) instead of cutting ``order`` to the kept rows;
* :func:`grouped_mm_composed` multiplies every row by every expert's matrix and keeps its own
  expert's product (E times the work, with ``torch.where`` so that a non-finite value of one
  expert or row never reaches another's output or gradient);
* :func:`expert_ffn_composed` runs every expert on every token and combines the products with
  the weights of the kept assignments (E / k times the work and the activation memory of the
  sparse forward, with the same ``torch.where`` isolation).

Both forms compute the same function; the eager form is the oracle of the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..activation.naive import phi_defined


def tracing() -> bool:
    """True inside a ``torch.compile`` / ``torch.export`` trace, where the compositions take
    their static-shape form (see the module docstring)."""
    return torch.compiler.is_compiling()


class Routing(NamedTuple):
    """What :func:`~gatezoo.kernels.routing.route` returns.

    weights: (N, k) float32, each row sums to 1 (the selected scores renormalised: the softmax
        over the selected logits for softmax scores).
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
    offsets: (E + 1,) int64, expert e owns sorted rows ``offsets[e]:offsets[e + 1]``;
        ``offsets[-1] == M'``.
    position: (N, k) int64, the sorted row of each assignment, -1 where it was dropped.
    counts: (E,) int64, rows per expert after the capacity (``offsets.diff()``).
    dropped: () int64, the number of assignments dropped by the capacity or masked out.

    Inside a ``torch.compile`` trace ``make_plan`` keeps every assignment: M' = N * k, the
    dropped ones after the kept ones, so ``offsets[-1]`` (the kept rows) may be less than M'
    and the rows past it belong to no expert (see the module docstring).
    """

    order: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    position: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor


SCORES = ("softmax", "sigmoid")
"""The affinity scores :func:`route_composed` takes (``score=``)."""
BIAS_ON = ("scores", "logits")
"""Where :func:`route_composed` adds the selection bias (``bias_on=``)."""


def selection_scores(z: torch.Tensor, bias: torch.Tensor | None, score: str, bias_on: str) -> torch.Tensor:
    """The (N, E) float32 values whose k largest per row are selected, from ``z`` (N, E) float32:
    ``z`` without a bias, ``z + bias`` for ``bias_on="logits"``, ``softmax(z) + bias`` or
    ``sigmoid(z) + bias`` for ``bias_on="scores"``."""
    if bias is None:
        return z
    b = bias.float()
    if bias_on == "logits":
        return z + b
    return (torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)) + b


def gate_weights(zk: torch.Tensor, score: str) -> torch.Tensor:
    """The selected scores renormalised, from the selected ``z`` (N, k): ``softmax(zk)`` for
    softmax scores, ``sigmoid(zk) / sum sigmoid(zk)`` (as ``softmax(log sigmoid(zk))``, which
    keeps its precision where every sigmoid underflows) for sigmoid scores."""
    if score == "softmax":
        return torch.softmax(zk, dim=-1)
    return torch.softmax(torch.nn.functional.logsigmoid(zk), dim=-1)


def sigmoid_factor(logits: torch.Tensor, noise: torch.Tensor | None, scale: float,
                   indices: torch.Tensor) -> torch.Tensor:
    """``1 - sigmoid(z)`` (N, k) float32 at the selected columns, ``z = (logits + noise) * scale``
    rounded as the forward rounded it: the factor by which the gradient of sigmoid-score weights
    differs from the softmax one (``d log sigmoid(z) / dz = 1 - sigmoid(z)``)."""
    zk = logits.float().gather(1, indices)
    if noise is not None:
        zk = zk + noise.float().gather(1, indices)
    return torch.sigmoid(-(zk * scale))


def route_composed(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, scale: float = 1.0, score: str = "softmax",
                   bias_on: str = "scores") -> Routing:
    """Top-k routing, computed in float32 (see the module docstring for the definition)."""
    num_experts = logits.shape[-1]
    z = logits.float()
    if noise is not None:
        z = z + noise.float()
    z = z * scale
    sel = selection_scores(z, bias, score, bias_on).detach()
    if torch.compiler.is_exporting():  # ONNX has no stable sort
        indices = _topk_by_rank(sel, k)
    else:  # a stable descending sort gives "ties: lower expert first"
        indices = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = gate_weights(torch.gather(z, -1, indices), score)
    # NaN in, NaN out: a NaN score need not be among the selected (a whole NaN softmax row ties)
    weights = torch.where(sel.isnan().any(-1, keepdim=True), float("nan"), weights)
    # a scatter rather than bincount: the output size must not depend on the ids (torch.compile)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device).scatter_add_(
        0, indices.reshape(-1), torch.ones_like(indices.reshape(-1)))
    return Routing(weights, indices, counts)


def _topk_by_rank(score: torch.Tensor, k: int) -> torch.Tensor:
    """The first k columns of the stable descending sort of ``score`` (N, E), NaN above every
    number as ``torch.sort`` ranks it, from pairwise comparisons: column e's place is the number
    of columns ranked before it (greater, or equal and to its left). (N, E, E) comparisons and a
    scatter, no sort: what an exported graph (ONNX has no stable sort) computes instead."""
    a, b = score[:, :, None], score[:, None, :]  # [n, j, e]: column j against column e
    nan_a, nan_b = a.isnan(), b.isnan()
    greater = (a > b) | (nan_a & ~nan_b)
    equal = (a == b) | (nan_a & nan_b)
    num = score.shape[-1]
    left = torch.ones(num, num, dtype=torch.bool, device=score.device).triu(1)  # [j, e]: j < e
    place = (greater | (equal & left)).sum(1)  # (N, E), a permutation of 0..E-1 per row
    columns = torch.arange(num, device=score.device).expand_as(place)
    return torch.zeros_like(place).scatter(1, place, columns)[:, :k]


def _stable_argsort(keys: torch.Tensor) -> torch.Tensor:
    """The stable ascending argsort of small non-negative int64 ``keys`` (M,): a plain sort of the
    unique keys ``keys * M + position`` (exported models have no stable sort)."""
    m = keys.numel()
    return torch.sort(keys * m + torch.arange(m, device=keys.device)).indices


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
        perm = _stable_argsort(group)
        sorted_group = group[perm]
        sizes = torch.zeros(num_experts + 1, dtype=torch.int64, device=group.device).scatter_add_(
            0, group, torch.ones_like(group))
        starts = sizes.cumsum(0) - sizes
        rank = torch.arange(group.numel(), device=group.device) - starts[sorted_group]
        over = torch.zeros_like(alive)
        over[perm] = (rank >= capacity) & (sorted_group < num_experts)
        kept = kept & ~over.view(k, n).t().reshape(-1)
    sortable = torch.where(kept, flat, torch.full_like(flat, num_experts))  # dropped ones sort last
    order = _stable_argsort(sortable)
    if not tracing():  # eager: only the kept rows (a trace keeps all N * k, see the module docstring)
        order = order[: int(kept.sum())]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device).scatter_add_(
        0, flat, kept.long())
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    position = torch.full((n * k,), -1, dtype=torch.int64, device=indices.device)
    position[order] = torch.arange(order.numel(), device=indices.device)
    position = torch.where(kept, position, -1)  # a trace's dropped rows have no assignment
    return DispatchPlan(order, order // k, offsets, position.view(n, k), counts, (~kept).sum())


def permute_composed(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows of ``x`` (N, d) in expert order: ``x[plan.token]`` (M', d)."""
    return x[plan.token]


def unpermute_composed(y: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``out[n] = sum_j weights[n, j] * y[position[n, j]]`` over the kept assignments; out (N, d)
    in ``y``'s dtype (the products are taken in float32, float64 for float64 ``y``)."""
    kept = plan.position >= 0
    acc = torch.promote_types(y.dtype, torch.float32)
    # a zero row after y's rows stands in for the dropped assignments (y may have no rows at all)
    padded = torch.cat([y.to(acc), y.new_zeros((1, y.shape[1]), dtype=acc)])
    rows = padded[torch.where(kept, plan.position, y.shape[0])]  # (N, k, d)
    w = torch.where(kept, weights.to(acc), torch.zeros((), dtype=acc, device=weights.device))
    return (w[..., None] * rows).sum(1).to(y.dtype)


def grouped_mm_composed(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ weight[e]``; x (M, K),
    weight (E, K, N), out (M, N). Rows past ``offsets[-1]`` are left zero."""
    if tracing():
        return _grouped_mm_static(x, weight, offsets)
    bounds = offsets.tolist()
    parts = [x[bounds[e]:bounds[e + 1]] @ weight[e] for e in range(weight.shape[0])]
    return torch.cat(parts + [x.new_zeros(x.shape[0] - bounds[-1], weight.shape[-1])], 0)


def row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each of ``rows`` sorted rows (rows,) int64: the number of experts whose rows
    end at or before it, so E for the rows past ``offsets[-1]``. (rows, E) comparisons, no
    data-dependent shape, so it traces."""
    r = torch.arange(rows, device=offsets.device)
    return (r[:, None] >= offsets[None, 1:]).sum(1)


def _grouped_mm_static(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm_composed` with every shape fixed by the input shapes (for traces)."""
    expert = row_experts(offsets, x.shape[0])
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    for e in range(weight.shape[0]):
        mine = (expert == e)[:, None]
        # masking the input too keeps the other rows' values out of this expert's gradient
        out = torch.where(mine, torch.where(mine, x, 0) @ weight[e], out)
    return out


def _row_bias(bias: torch.Tensor, offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """Each sorted row's expert bias (rows, width); zero past ``offsets[-1]``."""
    padded = torch.cat([bias, bias.new_zeros(1, bias.shape[1])])
    return padded[row_experts(offsets, rows)]


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
    if tracing():
        return _expert_ffn_static(x, w1, w2, weights, plan, spec, glu, alpha, b1, b2)
    rows = plan.order.numel()
    h = grouped_mm_composed(permute_composed(x, plan), w1, plan.offsets)
    if b1 is not None:
        h = h + _row_bias(b1, plan.offsets, rows)
    a = _activation(h, spec, glu, alpha)
    ys = grouped_mm_composed(a, w2, plan.offsets)
    if b2 is not None:
        ys = ys + _row_bias(b2, plan.offsets, rows)
    return unpermute_composed(ys, weights, plan)


def _activation(h: torch.Tensor, spec, glu: bool, alpha) -> torch.Tensor:
    if glu:
        half = h.shape[-1] // 2
        return phi_defined(h[..., :half], spec, alpha) * h[..., half:]
    return phi_defined(h, spec, alpha)


def _expert_ffn_static(x, w1, w2, weights, plan: DispatchPlan, spec, glu: bool, alpha, b1, b2) -> torch.Tensor:
    """:func:`expert_ffn_composed` with every shape fixed by the input shapes (for traces): each
    expert runs on every token, and token n sums ``weights[n, j] * f_e(x[n])`` over its kept
    assignments (products in float32, float64 for float64 input, as the torch path takes them)."""
    n, num_experts = x.shape[0], w1.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    # (N, E + 1) combine weights from the plan's sorted rows (column E: a trace's dropped rows)
    rows = plan.order.numel()
    expert = row_experts(plan.offsets, rows)
    w = weights.to(acc).reshape(-1)[plan.order]
    combine = w.new_zeros(n, num_experts + 1).index_put((plan.token, expert), w, accumulate=True)
    chosen = torch.zeros(n, num_experts + 1, dtype=torch.bool, device=x.device).index_put(
        (plan.token, expert), torch.ones_like(expert, dtype=torch.bool))
    chosen, combine = chosen[:, :num_experts].t()[..., None], combine[:, :num_experts].t()[..., None]  # (E, N, 1)
    # (E, N, d) and the masks after each step: a non-finite value of one expert or token reaches
    # neither another's output nor another's gradient (0 * nan would)
    xe = torch.where(chosen, x, 0)
    h = xe @ w1
    if b1 is not None:
        h = h + b1[:, None]
    ys = torch.where(chosen, _activation(h, spec, glu, alpha), 0) @ w2
    if b2 is not None:
        ys = ys + b2[:, None]
    return torch.where(chosen, combine * ys.to(acc), 0).sum(0).to(x.dtype)
