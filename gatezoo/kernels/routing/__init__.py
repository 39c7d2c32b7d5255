"""Mixture-of-experts routing: top-k routing of router logits, the dispatch plan, the token
permutation by expert and its weighted inverse, and the grouped matmul over the experts'
contiguous row ranges (see docs/architecture.md, 'The math', for the routers built on them).

A dropless MoE feed-forward is, with these ops::

    r = route(logits, k)                               # weights (N, k), indices (N, k), counts (E,)
    plan = make_plan(r.indices, E)                     # assignments sorted by expert, offsets (E+1,)
    xs = permute(x, plan)                              # (M, d) rows in expert order
    h = grouped_mm(xs, w1, plan.offsets)               # (M, 2h) each expert's slice x its own w1[e]
    ys = grouped_mm(glu_packed(h, "silu"), w2, plan.offsets)
    y = unpermute(ys, r.weights, plan)                 # (N, d) weighted sum over each token's choices

or, the same in one call (fused per expert on the torch backend)::

    y = expert_ffn(x, w1, w2, r.weights, plan, "silu")

Files (the layout every op copies, see docs/architecture.md, 'Layers and layout'):

* ``naive.py`` - the plain compositions, the oracles.
* ``torch_path.py`` - the CPU-efficient torch backend (custom autograd, no dense E x N masks).
* ``triton.py`` - the fused routing kernel, the gather/scatter kernels and the grouped GEMM.
* ``__init__.py`` - validation and :func:`~gatezoo.kernels.backend.dispatch` (this file).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..backend import dispatch, positive_number
from .naive import (
    BIAS_ON,
    SCORES,
    DispatchPlan,
    Routing,
    expert_ffn_composed,
    grouped_mm_composed,
    permute_composed,
    plan_composed,
    route_composed,
    tracing,
    unpermute_composed,
)

__all__ = [
    "DispatchPlan", "Routing", "expert_ffn", "expert_ffn_composed", "grouped_mm", "grouped_mm_composed", "make_plan",
    "permute", "permute_composed", "plan_composed", "route", "route_composed", "unpermute", "unpermute_composed",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got {getattr(t, 'dtype', type(t))}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def _choice(name: str, value, choices: tuple) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {t.device}")


def route(logits: torch.Tensor, k: int, *, bias: torch.Tensor | None = None, noise: torch.Tensor | None = None,
          scale: float = 1.0, score: str = "softmax", bias_on: str = "scores", backend: str = "auto") -> Routing:
    """Top-k routing of router logits (N, E), in float32, with ``z = (logits + noise) * scale``
    and the affinity scores ``s = softmax(z)`` (``score="softmax"``) or ``sigmoid(z)``:

    * selection: the k largest per row (ties to the lower expert) of ``s + bias`` (the default
      ``bias_on="scores"``: DeepSeek-V3's auxiliary-loss-free balancing, eq. 16), of ``z + bias``
      (``bias_on="logits"``, gatezoo's earlier default, kept as an option), or of ``z``
      when there is no bias (the same experts as ``s``);
    * weights: the selected scores renormalised, ``s_i / sum_{j in S} s_j``: ``softmax`` over
      the k selected ``z`` for softmax scores, ``sigmoid(z_i) / sum sigmoid(z_j)`` for sigmoid
      scores. The bias never enters them. A row with a NaN selection score gets NaN weights.

    ``k = E`` with no bias and softmax scores is the dense softmax router.

    Args:
        logits: (N, E) router logits; the weights are differentiable with respect to them.
        k: experts per token, 1 <= k <= E.
        bias: optional (E,) selection bias (auxiliary-loss-free balancing); not differentiated.
        noise: optional (N, E) noise added to the logits (Gumbel or Gaussian samples).
        scale: multiplies the noisy logits (1/temperature), > 0.
        score: ``"softmax"`` (default) or ``"sigmoid"``, the affinity scores.
        bias_on: ``"scores"`` (default) or ``"logits"``, what the bias is added to for the selection.
        backend: ``"auto" | "torch" | "triton"``.
    """
    _float("logits", logits, 2)
    num_experts = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int with 1 <= k <= num_experts ({num_experts}), got {k!r}")
    _choice("score", score, SCORES)
    _choice("bias_on", bias_on, BIAS_ON)
    if bias is not None:
        _float("bias", bias, 1)
        if bias.shape[0] != num_experts:
            raise ValueError(f"bias must have shape ({num_experts},), got {tuple(bias.shape)}")
        _same_device("bias", bias, logits)
    if noise is not None:
        _float("noise", noise)
        if noise.shape != logits.shape:
            raise ValueError(f"noise must have logits' shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
        _same_device("noise", noise, logits)
    args = (logits, k, bias, noise, positive_number("scale", scale), score, bias_on)

    def torch_path():
        from .torch_path import route_torch

        return route_torch(*args)

    def triton_path():
        from .triton import route_triton

        return route_triton(*args)

    return dispatch(backend, logits, naive=lambda: route_composed(*args), torch_path=torch_path,
                    triton_path=triton_path, empty=logits.numel() == 0)


def make_plan(indices: torch.Tensor, num_experts: int, *, capacity: int | None = None,
              keep: torch.Tensor | None = None) -> DispatchPlan:
    """The dispatch plan of expert choices ``indices`` (N, k): assignments sorted by expert
    (stable), offsets per expert, each assignment's sorted row. No gradients flow through it.

    ``keep`` (N, k) bool drops assignments up front (e.g. weight 0). ``capacity`` caps every
    expert's rows: assignments are ranked by choice slot, then token index, and those past the
    capacity are dropped (they add nothing to the output; the residual carries the token).

    ``indices`` must lie in ``[0, num_experts)`` (checked with one read of its min and max,
    except inside a ``torch.compile`` trace, which cannot read values; there an out-of-range id
    is the caller's error). Inside a trace the plan keeps all N * k assignments, the dropped ones
    past ``offsets[-1]`` (see :class:`DispatchPlan`).
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32/int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
    if indices.dim() != 2:
        raise ValueError(f"indices must have shape (tokens, k), got {tuple(indices.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    # a value check reads the device (a host sync), which a torch.compile trace cannot do
    if indices.numel() and not tracing() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(f"indices must lie in [0, {num_experts}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    # a torch.export trace with a dynamic batch hands in a SymInt capacity (ceil(c N k / E))
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, (int, torch.SymInt))
                                 or (not tracing() and capacity < 0)):
        raise ValueError(f"capacity must be a non-negative int or None, got {capacity!r}")
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != indices.shape:
            raise ValueError(f"keep must be a bool tensor of indices' shape {tuple(indices.shape)}, got "
                             f"{getattr(keep, 'dtype', type(keep))} {tuple(getattr(keep, 'shape', ()))}")
        _same_device("keep", keep, indices)
    plan = plan_composed(indices.long(), num_experts, capacity, keep)
    # an inference tensor (made under torch.inference_mode) has no version counter to stamp: such
    # a plan is checked like any handed-in plan
    if not tracing() and not plan.offsets.is_inference():
        _MADE[plan.offsets] = _stamp(plan)
    return plan


# Plans make_plan returned, by their offsets tensor: the ops skip the value checks (a host sync
# each) for such a plan as long as it is unchanged, i.e. the same field tensors, none written
# in place since (their version counters), so a MoE layer's own plan costs no second sync.
# Plans built under torch.inference_mode are not recorded (inference tensors have no counter).
_MADE = WeakIdKeyDictionary()


def _stamp(plan: DispatchPlan) -> tuple:
    return tuple((weakref.ref(t), t._version) for t in plan)


def _unchanged(plan: DispatchPlan) -> bool:
    made = _MADE.get(plan.offsets)
    return made is not None and all(ref() is t and version == t._version for (ref, version), t in zip(made, plan))


_PLAN_DIMS = {"order": 1, "token": 1, "offsets": 1, "position": 2, "counts": 1, "dropped": 0}


def _check_plan(plan, device: torch.device, tokens: int | None = None) -> None:
    """Check a :class:`DispatchPlan` handed to an op before a kernel indexes with it.

    Always (no device read): the type, every field an int64 tensor on ``device`` with its number
    of dimensions, ``token`` of ``order``'s length, ``offsets`` of length E + 1 >= 2, ``counts``
    of length E, ``position`` of ``tokens`` rows when given, and at most N * k rows. Then,
    outside a torch.compile trace, the values, with one host sync for all of them: ``offsets``
    starts at 0, never decreases and ends at the number of rows; ``token`` lies in [0, N),
    ``order`` in [0, N * k) and ``position`` in [-1, rows); not for a plan that :func:`make_plan`
    returned and that is unchanged since (no field replaced, none written in place), which is
    right by construction. What is trusted: that ``order``, ``token`` and ``position`` describe
    the same permutation and ``counts`` equals ``offsets.diff()`` (checking that would cost as
    much as the op); a plan that breaks this but passes the checks gives wrong numbers, never an
    out-of-bounds access.
    """
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan must be a DispatchPlan from make_plan, got {type(plan).__name__}")
    for name, dims in _PLAN_DIMS.items():
        t = getattr(plan, name)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"plan.{name} must be an int64 tensor (as make_plan builds it), got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != dims:
            raise ValueError(f"plan.{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"plan must be on {device}, got plan.{name} on {t.device}")
    n, k = plan.position.shape
    rows = plan.order.shape[0]
    if plan.token.shape[0] != rows:
        raise ValueError(f"plan.token must have plan.order's length {rows}, got {plan.token.shape[0]}")
    if plan.offsets.shape[0] < 2:
        raise ValueError(f"plan.offsets must have length experts + 1 >= 2, got {plan.offsets.shape[0]}")
    if plan.counts.shape[0] != plan.offsets.shape[0] - 1:
        raise ValueError(f"plan.counts must have one entry per expert ({plan.offsets.shape[0] - 1}), got "
                         f"{plan.counts.shape[0]}")
    if tokens is not None and n != tokens:
        raise ValueError(f"x must have the plan's {n} tokens (plan.position has shape {tuple(plan.position.shape)}), "
                         f"got {tokens}")
    if rows > n * k:
        raise ValueError(f"plan.order has {rows} rows, more than the plan's {n} x {k} assignments")
    if tracing() or _unchanged(plan):  # a trace cannot read values; make_plan's plans are right
        return
    offsets, token, order, position = plan.offsets, plan.token, plan.order, plan.position
    conds = {
        "offsets": (offsets[0] == 0) & (offsets[1:] >= offsets[:-1]).all() & (offsets[-1] == rows),
        "token": (token >= 0).all() & (token < n).all(),
        "order": (order >= 0).all() & (order < n * k).all(),
        "position": (position >= -1).all() & (position < rows).all(),
    }
    ok = torch.stack(list(conds.values()))
    if bool(ok.all()):
        return
    name = list(conds)[int((~ok).nonzero()[0, 0])]
    if name == "offsets":
        shown = offsets.tolist()
        raise ValueError(f"plan.offsets must start at 0, never decrease and end at the plan's {rows} rows "
                         f"(len(plan.order)), got {shown[:10]}{'...' if len(shown) > 10 else ''}")
    t = getattr(plan, name)
    bound = {"token": f"[0, {n})", "order": f"[0, {n * k})", "position": f"[-1, {rows})"}[name]
    raise ValueError(f"plan.{name} must lie in {bound}, got values in [{int(t.min())}, {int(t.max())}]")


def permute(x: torch.Tensor, plan: DispatchPlan, *, backend: str = "auto") -> torch.Tensor:
    """Rows of ``x`` (N, d) gathered into expert order, (M', d): row i is ``x[plan.token[i]]``.

    ``plan`` is checked as described in ``_check_plan``: its shapes and dtypes always, and,
    outside a torch.compile trace, ``token`` in [0, N) and the other ranges (one host sync).
    Trusted: that its fields describe one permutation (as :func:`make_plan` builds them).
    """
    _float("x", x, 2)
    _check_plan(plan, x.device, tokens=x.shape[0])

    def torch_path():
        from .torch_path import permute_torch

        return permute_torch(x, plan)

    def triton_path():
        from .triton import permute_triton

        return permute_triton(x, plan)

    return dispatch(backend, x, naive=lambda: permute_composed(x, plan), torch_path=torch_path,
                    triton_path=triton_path, empty=x.numel() == 0 or plan.token.numel() == 0)


def unpermute(y: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, *, backend: str = "auto") -> torch.Tensor:
    """The weighted inverse of :func:`permute`: ``out[n] = sum_j weights[n, j] * y[position[n, j]]``
    over the kept assignments, out (N, d) in ``y``'s dtype.

    ``plan`` is checked as in :func:`permute` (``position`` in [-1, M'), ``token`` in [0, N)...
    outside a torch.compile trace); trusted: that its fields describe one permutation.
    """
    _float("y", y, 2)
    _float("weights", weights, 2)
    _check_plan(plan, y.device)
    if weights.shape != plan.position.shape:
        raise ValueError(f"weights must have the plan's shape (tokens, k) = {tuple(plan.position.shape)}, "
                         f"got {tuple(weights.shape)}")
    if y.shape[0] != plan.order.shape[0]:
        raise ValueError(f"y must have one row per kept assignment ({plan.order.shape[0]}), got {y.shape[0]}")
    _same_device("weights", weights, y)

    def torch_path():
        from .torch_path import unpermute_torch

        return unpermute_torch(y, weights, plan)

    def triton_path():
        from .triton import unpermute_triton

        return unpermute_triton(y, weights, plan)

    empty = y.shape[1] == 0 or weights.numel() == 0
    return dispatch(backend, y, naive=lambda: unpermute_composed(y, weights, plan), torch_path=torch_path,
                    triton_path=triton_path, empty=empty)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """One matmul per expert on its contiguous rows: ``out[o[e]:o[e+1]] = x[o[e]:o[e+1]] @ weight[e]``
    (inside a torch.compile trace: every row times every matrix, each row keeping its own).

    Args:
        x: (M, K) rows in expert order (from :func:`permute`).
        weight: (E, K, N) the experts' matrices, x's dtype.
        offsets: (E + 1,) int32/int64, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] <= M``
            (rows past it give zero rows). Checked with one host sync, except inside a
            torch.compile trace (which cannot read values: there they are trusted).
        backend: ``"auto" | "torch" | "triton"``.
    """
    _float("x", x, 2)
    _float("weight", weight, 3)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (experts, {x.shape[1]}, out) to match x, got {tuple(weight.shape)}")
    _same_device("weight", weight, x)
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be an int32/int64 tensor, got {getattr(offsets, 'dtype', type(offsets))}")
    if tuple(offsets.shape) != (weight.shape[0] + 1,):
        raise ValueError(f"offsets must have shape (experts + 1,) = ({weight.shape[0] + 1},), "
                         f"got {tuple(offsets.shape)}")
    _same_device("offsets", offsets, x)
    if not tracing() and not bool((offsets[0] == 0) & (offsets[1:] >= offsets[:-1]).all()
                                  & (offsets[-1] <= x.shape[0])):
        raise ValueError(f"offsets must start at 0, never decrease and end at most at x's {x.shape[0]} rows, "
                         f"got {offsets.tolist()[:8]}{'...' if offsets.numel() > 8 else ''}")
    offsets = offsets.long()

    def torch_path():
        from .torch_path import grouped_mm_torch

        return grouped_mm_torch(x, weight, offsets)

    def triton_path():
        from .triton import grouped_mm_triton

        return grouped_mm_triton(x, weight, offsets)

    empty = x.shape[0] == 0 or weight.shape[-1] == 0 or x.shape[1] == 0
    return dispatch(backend, x, naive=lambda: grouped_mm_composed(x, weight, offsets), torch_path=torch_path,
                    triton_path=triton_path,
                    triton_unsupported=lambda: _fp64(x, weight), empty=empty)


def _fp64(*ts):
    from ..backend import float64_unsupported

    return float64_unsupported(*ts)


def _check_stack(name: str, t, shape: tuple, like: torch.Tensor) -> None:
    """``t`` a float tensor of exactly ``shape``, with ``like``'s dtype and device."""
    _float(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have x's dtype {like.dtype}, got {t.dtype}")
    _same_device(name, t, like)


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan,
               kind: str, *, glu: bool = True, alpha=None, b1: torch.Tensor | None = None,
               b2: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The experts' whole feed-forward of a MoE layer, ``out[n] = sum_j weights[n, j] f_e(x[n])``
    over token n's kept assignments (e = its expert), with ``f_e(x) = act(x w1[e] + b1[e]) w2[e]
    + b2[e]``; equal to :func:`permute`, :func:`grouped_mm`, the activation, :func:`grouped_mm`
    and :func:`unpermute` in a row (:func:`~.naive.expert_ffn_composed`).

    The torch backend runs those steps expert by expert on its slice, while the slice is in cache,
    and saves only the pre-activation (see :class:`~.torch_path.ExpertFFNFunction`): on a CPU it
    costs little beyond its matmuls. The Triton backend runs the five kernels in a row. Inside a
    torch.compile or torch.export trace it is the composition's static-shape form, every expert
    on every token (see :mod:`.naive` and docs/export.md).

    Args:
        x: (N, d) tokens.
        w1: (E, d, 2H) when ``glu`` (the two halves ``[a | b]`` packed, as :func:`~gatezoo.kernels.glu_packed`
            reads them), else (E, d, H).
        w2: (E, H, d_out).
        weights: (N, k) combine weights, the plan's shape.
        plan: the :class:`DispatchPlan` of the routing (from :func:`make_plan`).
        kind: the activation, a name of :data:`~gatezoo.kernels.KINDS` (``"silu"`` for SwiGLU).
        glu: gate the second half by ``phi`` of the first (a GLU expert), or apply ``phi`` alone.
        alpha: expanded-gate parameter (a float or 0-dim tensor, differentiable) or None.
        b1, b2: optional (E, 2H or H) and (E, d_out) biases.
        backend: ``"auto" | "torch" | "triton"``.

    ``plan`` is checked as in :func:`permute` (shapes and dtypes; outside a torch.compile trace
    also offsets from 0 to the plan's rows, never decreasing, and the index ranges, with one host
    sync), and ``w1``, ``w2`` must hold one matrix per expert of the plan (``len(plan.offsets) -
    1``). Trusted: that its fields describe one permutation, as :func:`make_plan` builds them.
    """
    from ..activation import _check_alpha, get_kind

    _float("x", x, 2)
    spec = get_kind(kind)
    if not isinstance(glu, bool):
        raise TypeError(f"glu must be a bool, got {type(glu).__name__}")
    _check_plan(plan, x.device)
    _float("w1", w1, 3)
    experts = plan.offsets.numel() - 1
    if w1.shape[0] != experts or w1.shape[1] != x.shape[1] or (glu and w1.shape[2] % 2):
        raise ValueError(f"w1 must have shape ({experts}, {x.shape[1]}, {'2H' if glu else 'H'}) for the plan's "
                         f"{experts} experts and x's width, got {tuple(w1.shape)}")
    hidden = w1.shape[2] // 2 if glu else w1.shape[2]
    _check_stack("w1", w1, tuple(w1.shape), x)
    _float("w2", w2, 3)
    if w2.shape[:2] != (experts, hidden):
        raise ValueError(f"w2 must have shape ({experts}, {hidden}, d_out) to follow w1, got {tuple(w2.shape)}")
    _check_stack("w2", w2, tuple(w2.shape), x)
    if b1 is not None:
        _check_stack("b1", b1, (experts, w1.shape[2]), x)
    if b2 is not None:
        _check_stack("b2", b2, (experts, w2.shape[2]), x)
    _float("weights", weights, 2)
    if weights.shape != plan.position.shape or x.shape[0] != plan.position.shape[0]:
        raise ValueError(f"x and weights must cover the plan's {plan.position.shape[0]} tokens with weights of shape "
                         f"(tokens, k) = {tuple(plan.position.shape)}, got x {tuple(x.shape)} and weights "
                         f"{tuple(weights.shape)}")
    _same_device("weights", weights, x)
    alpha_t = _check_alpha(alpha, spec, x)
    args = (x, w1, w2, weights, plan, spec, glu, alpha_t, b1, b2)

    def torch_path():
        from .torch_path import expert_ffn_torch

        return expert_ffn_torch(*args)

    def triton_path():
        # the kernels themselves: the public ops would check the plan again (a host sync each)
        from ..activation import gated_act, glu_packed
        from .naive import _row_bias
        from .triton import grouped_mm_triton, permute_triton, unpermute_triton

        rows = plan.order.numel()
        h = grouped_mm_triton(permute_triton(x, plan), w1, plan.offsets)
        if b1 is not None:
            h = h + _row_bias(b1, plan.offsets, rows)
        a = (glu_packed if glu else gated_act)(h, kind, alpha_t, backend="triton")
        ys = grouped_mm_triton(a, w2, plan.offsets)
        if b2 is not None:
            ys = ys + _row_bias(b2, plan.offsets, rows)
        return unpermute_triton(ys, weights, plan)

    empty = x.numel() == 0 or plan.order.numel() == 0 or w1.shape[2] == 0 or w2.shape[2] == 0
    return dispatch(backend, x, naive=lambda: expert_ffn_composed(*args), torch_path=torch_path,
                    triton_path=triton_path, triton_unsupported=lambda: _fp64(x, w1), empty=empty)
