"""Mixture-of-experts blocks: the sparse :class:`MoEFeedForward`, AdaMoLE's :class:`MoLELinear`,
pre-gating across a stack of MoE layers, and the load statistics and auxiliary losses.

Every layer flattens its tokens to (N, d), asks its router (:mod:`gatezoo.blocks.routing`) for a
:class:`~gatezoo.blocks.routing.RoutingResult`, and runs only the selected (token, expert)
pairs through the routing ops of :mod:`gatezoo.kernels.routing`::

    plan = make_plan(indices, E, capacity=..., keep=keep)   # assignments sorted by expert
    xs   = permute(x, plan)                                 # rows in expert order
    h    = act(grouped_mm(xs, w1, plan.offsets))            # each expert's rows x its own w1[e]
    y    = unpermute(grouped_mm(h, w2, plan.offsets), weights, plan)

See docs/architecture.md, 'The math' ('Routers and mixtures of experts') for the formulas and
docs/routing.md for usage.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from gatezoo.kernels import KINDS, gated_act, glu_packed
from gatezoo.kernels.routing import DispatchPlan, expert_ffn, grouped_mm, make_plan, permute, unpermute
from gatezoo.kernels.routing.naive import row_experts

from .activation import GLU_FAMILIES, GLU_VARIANTS, glu_hidden_features, glu_variant
from .checks import (
    ArgumentTypeError,
    check_backend,
    check_bool,
    check_float_tensor,
    check_non_negative,
    check_probability,
)
from .dropout import Dropout
from .routing import (
    ROUTERS,
    Router,
    RoutingResult,
    TaskAwareRouter,
    make_router,
    router_z_loss,
    switch_balance_loss,
)

__all__ = [
    "EXPERTS", "MoEFeedForward", "MoLELinear", "PreGatedMoEStack", "link_pregated", "moe_aux_loss", "moe_stats",
    "reset_moe_stats", "set_moe_process_group", "set_task_ids", "unlink_pregated",
    "TaskExpertsFeedForward", "extract_task_experts",
]

EXPERTS = sorted(GLU_VARIANTS) + [f"mlp-{k}" for k in sorted(KINDS)] + [
    f"mlp-x{k}" for k in sorted(KINDS) if KINDS[k].takes_alpha]
"""Expert names of :class:`MoEFeedForward`: every GLU name of
:data:`~gatezoo.blocks.activation.GLU_VARIANTS` (packed ``w1`` of width 2h, gated by
:func:`~gatezoo.kernels.glu_packed`), ``mlp-<kind>`` for a plain two-layer MLP with the
activation ``kind`` of :data:`~gatezoo.kernels.KINDS` (``mlp-gelu``, ``mlp-relu``...) and
``mlp-x<kind>`` for its expanded form (one trainable alpha, Huang 2024). GLU family names
without an order (``xswiglu``...) are accepted as in :func:`~gatezoo.blocks.activation.glu_variant`."""


def _expert_kind(expert) -> tuple[str, bool, bool]:
    """``(kernel kind, expanded, is_glu)`` of an expert name."""
    if not isinstance(expert, str):
        raise ArgumentTypeError(f"expert must be a name, got {type(expert).__name__}")
    if expert.startswith("mlp-"):
        act = expert[4:]
        if act in KINDS:
            return act, False, False
        if act.startswith("x") and act[1:] in KINDS and KINDS[act[1:]].takes_alpha:
            return act[1:], True, False
    elif expert in GLU_VARIANTS or expert in GLU_FAMILIES or expert == "xnormglu":
        kind, expanded, _ = glu_variant(expert)
        return kind, expanded, True
    raise ValueError(f"expert must be a GLU name ({sorted(GLU_VARIANTS)}) or 'mlp-<kind>' / 'mlp-x<kind>' with kind "
                     f"in {sorted(KINDS)}, got {expert!r}")


def _round8(v: float) -> int:
    return max(8, math.ceil(v / 8) * 8)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value


def _expand_task_ids(task_ids, lead: tuple[int, ...]):
    """Per-token task ids (N,) from an int, a () tensor, one id per token (shape ``lead``) or
    one per batch row (shape ``(lead[0],)``)."""
    if task_ids is None or not isinstance(task_ids, torch.Tensor) or task_ids.dim() == 0:
        return task_ids  # None, int, scalar: the router checks and broadcasts
    if tuple(task_ids.shape) == tuple(lead):
        return task_ids.reshape(-1)
    if task_ids.dim() == 1 and len(lead) >= 2 and task_ids.shape[0] == lead[0]:
        return task_ids.repeat_interleave(math.prod(lead[1:]))
    per_row = f" or ({lead[0]},) (one per batch row)" if len(lead) >= 2 else ""
    raise ValueError(f"task_ids must have shape () (one task), {tuple(lead)} (one per token){per_row}, got "
                     f"{tuple(task_ids.shape)}")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _build_router(router, dim: int, num_experts: int, k: int | None, router_args, backend: str, dd) -> Router:
    if router_args is not None and not isinstance(router_args, dict):
        raise ArgumentTypeError(f"router_args must be a dict of the router's keyword arguments or None, got "
                                f"{router_args!r} ({type(router_args).__name__})")
    if isinstance(router, Router):
        if router_args:
            raise ValueError("router_args only applies when router is a name")
        if router.dim != dim or router.num_experts != num_experts:
            raise ValueError(f"router must route {dim}-wide tokens to num_experts={num_experts} experts, got a router "
                             f"with dim={router.dim}, num_experts={router.num_experts}")
        if k is not None and k != router.k:
            raise ValueError(f"k={k} contradicts the given router's k={router.k}")
        return router
    if not isinstance(router, str):
        raise ArgumentTypeError(f"router must be a name in {sorted(ROUTERS)} or a Router, got "
                                f"{type(router).__name__}")
    args = dict(router_args or {})
    for key in ("dim", "num_experts"):  # the layer's own arguments: one source of truth
        if key in args:
            own = "in_features" if key == "dim" else key
            raise ValueError(f"router_args must not set {key!r} (got {key}={args[key]!r}): the router takes the "
                             f"layer's {own}")
    if "k" in args:
        if k is not None and args["k"] != k:
            raise ValueError(f"k={k} contradicts router_args k={args['k']}")
        k = args.pop("k")
    args.setdefault("backend", backend)
    for key, value in dd.items():
        args.setdefault(key, value)
    return make_router(router, dim, num_experts, k=k, **args)


class _MoEModule(nn.Module):
    """What every MoE layer shares: the router call, the load counters, the auxiliary loss."""

    def _setup(self, router: Router, balance_coef: float, z_loss_coef: float, device) -> None:
        for name, value in (("balance_coef", balance_coef), ("z_loss_coef", z_loss_coef)):
            check_non_negative(name, value)
        self.router = router
        self.num_experts = router.num_experts
        self.k = router.k
        self.balance_coef, self.z_loss_coef = float(balance_coef), float(z_loss_coef)
        e = router.num_experts
        # load counters of training forwards (not saved in the state dict): assignments routed to each
        # expert (before any capacity), assignments dropped by the capacity, tokens left with no
        # active expert, tokens seen
        self.register_buffer("stat_load", torch.zeros(e, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("stat_dropped", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("stat_zero", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("stat_tokens", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        # the routing weight each expert received in all (its share of the gate; for a dense router,
        # whose every expert sees every token, the one measure of balance)
        self.register_buffer("stat_weight", torch.zeros(e, dtype=torch.float64, device=device), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.last_aux: dict = {}
        self.last_routing: RoutingResult | None = None
        self.task_ids = None  # default task ids for forwards that do not pass any (see set_task_ids)
        self.process_group = None  # set_moe_process_group: reduce the routing statistics over it

    def _route(self, x: torch.Tensor, task_ids) -> RoutingResult:
        return self.router(x, task_ids)

    def _global_counts(self, load: torch.Tensor, r: RoutingResult, plan: DispatchPlan):
        """``(load, tokens, dropped, zero-expert tokens, world)`` of this forward summed over the
        process group (one all-reduce; tensors), or of this process alone without one (``tokens``
        then a Python int)."""
        masked = 0 if r.keep is None else (~r.keep).sum()
        dropped, zero = plan.dropped - masked, (plan.position < 0).all(1).sum()
        tokens = r.indices.shape[0]
        group = self.process_group
        world = 1
        if group is not None and self.training and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size(group)
        if world == 1:  # the common case: no packing, no copy to the device
            return load, tokens, dropped, zero, 1
        local = [load, torch.tensor([tokens], device=load.device), dropped.reshape(1).to(load.device), zero.reshape(1)]
        packed = torch.cat([t.to(torch.int64) for t in local])
        torch.distributed.all_reduce(packed, group=group)
        e = self.num_experts
        return packed[:e], packed[e], packed[e + 1], packed[e + 2], world

    def _global_weight(self, r: RoutingResult, world: int) -> torch.Tensor:
        """The routing weight each expert got in this forward (active choices only), summed over
        the process group when there is one."""
        w = r.weights.detach().to(torch.float64)
        if r.keep is not None:
            w = w * r.keep
        total = torch.zeros(self.num_experts, dtype=torch.float64, device=w.device).scatter_add_(
            0, r.indices.reshape(-1).to(w.device), w.reshape(-1))
        if world > 1:
            torch.distributed.all_reduce(total, group=self.process_group)
        return total

    def _after_routing(self, r: RoutingResult, plan: DispatchPlan) -> None:
        """Training bookkeeping (bias update, counters), then the auxiliary losses.

        With a process group (:func:`set_moe_process_group`) the load, token count, drops and
        zero-expert tokens are summed over its processes first, so every process updates a
        selection bias and counts with the global batch's load, and the balance and z-losses are
        each process's share of the global batch's losses times the world size W: DDP's average
        of the gradients then gives exactly the gradient of the global losses (the Switch loss
        ``E sum_i f_i P_i`` is not a mean over tokens, so per-process losses would differ)."""
        world, n_all = 1, None
        if self.training:
            with torch.no_grad():
                ones = torch.ones_like(r.indices) if r.keep is None else r.keep.long()
                load = torch.zeros(self.num_experts, dtype=torch.int64, device=r.indices.device).scatter_add_(
                    0, r.indices.reshape(-1), ones.reshape(-1))  # no host sync, unlike bincount on CUDA
                load, tokens, dropped, zero, world = self._global_counts(load, r, plan)
                update = getattr(self.router, "update_bias", None)
                if update is not None:
                    update(load)
                self.stat_load += load.to(self.stat_load.device)
                self.stat_dropped += dropped.to(self.stat_dropped.device)
                self.stat_zero += zero.to(self.stat_zero.device)
                self.stat_tokens += tokens if isinstance(tokens, int) else tokens.to(self.stat_tokens.device)
                self.stat_weight += self._global_weight(r, world).to(self.stat_weight.device)
                if world > 1:
                    n_all = tokens
        aux = dict(r.aux)
        n = r.indices.shape[0]
        if n_all is None:
            if self.router.balance and self.balance_coef:
                aux["balance"] = self.balance_coef * switch_balance_loss(r.probs, r.indices, self.num_experts,
                                                                         keep=r.keep)
            if r.logits is not None and self.z_loss_coef:
                aux["z"] = self.z_loss_coef * router_z_loss(r.logits)
        else:  # this process's share of the global losses, times the world size
            scale = world / n_all.clamp(min=1).to(torch.float32)
            aux = {name: value * (n * scale) for name, value in aux.items()}  # the routers' own: token means
            if self.router.balance and self.balance_coef:
                f = load.to(r.probs.dtype) / n_all.clamp(min=1)
                aux["balance"] = self.balance_coef * self.num_experts * (f * r.probs.sum(0)).sum() * scale
            if r.logits is not None and self.z_loss_coef:
                aux["z"] = self.z_loss_coef * (torch.logsumexp(r.logits.float(), -1) ** 2).sum() * scale
        # kept for inspection only, detached: no autograd graph outlives the step through them
        self.last_aux = {name: value.detach() for name, value in aux.items()}
        self.last_routing = _detached(r)
        if aux:
            # a sum over a stack, not 0 + value: inductor folds that into the value itself, and then
            # loses the gradient of the one tensor returned both as aux_loss and in last_aux
            self.aux_loss = torch.stack([value.float() for value in aux.values()]).sum()
        else:
            self.aux_loss = torch.zeros((), dtype=torch.float32, device=r.weights.device)

    def __getstate__(self):
        """For ``copy.deepcopy`` and pickling: ``aux_loss`` (and a pre-gated routing not yet
        consumed, ``_pending``) hold the autograd graph of the last forward, which can be neither
        copied nor pickled, so the copy gets None for them (as before its first forward)."""
        state = dict(super().__getstate__())
        state["aux_loss"] = None
        if "_pending" in state:
            state["_pending"] = None
        if state.get("_offload") is not None:  # a cache with its fetch thread stays with the original
            state["_offload"] = None
        return state

    def _tokens(self, x, task_ids):
        """Check ``x`` (..., in_features) and flatten it: ``(tokens (N, d), leading shape, task ids
        per token or None)``."""
        check_float_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        lead = tuple(x.shape[:-1])
        task_ids = _expand_task_ids(self.task_ids if task_ids is None else task_ids, lead)
        return x.reshape(-1, self.in_features), lead, task_ids

    def reset_stats(self) -> None:
        for buf in (self.stat_load, self.stat_dropped, self.stat_zero, self.stat_tokens, self.stat_weight):
            buf.zero_()


def _detached(r: RoutingResult) -> RoutingResult:
    """``r`` with every tensor detached (``aux`` entries included)."""
    def det(t):
        return t.detach() if isinstance(t, torch.Tensor) else t
    return RoutingResult(*(det(t) for t in r[:5]), {name: det(v) for name, v in r.aux.items()})


def _no_rows(n: int, width: int, like: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The output when no assignment is dispatched: zeros, still attached to the weights' graph."""
    return like.new_zeros(n, width) + (weights.sum() * 0).to(like.dtype)


def _row_bias(bias: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Each sorted row's expert bias (M', width); zero for the rows past ``offsets[-1]`` that a
    plan made inside a torch.compile trace carries."""
    padded = torch.cat([bias, bias.new_zeros(1, bias.shape[1])])
    return padded[row_experts(plan.offsets, plan.order.numel())]


class MoEFeedForward(_MoEModule):
    """A mixture-of-experts feed-forward: a router picks experts per token and only the chosen
    (token, expert) pairs are computed, ``y = sum_{i chosen} w_i f_i(x)``.

    timm's ``Mlp`` signature comes first, so ``functools.partial(MoEFeedForward, num_experts=8,
    k=2)`` is a ``mlp_layer`` of timm's ``VisionTransformer``.

    Args:
        in_features: model width d.
        hidden_features: width of each expert. Default, so that a token's active parameters
            match a dense feed-forward: for GLU experts ``glu_hidden_features(d) // k`` and for
            MLP experts ``ceil(4 d / k)``, both rounded up to a multiple of 8 (k = E for dense
            routers and for the adaptive threshold). timm passes ``int(d * mlp_ratio)``, which
            then is each expert's width.
        out_features: output width (default d).
        act_layer: accepted for timm's signature and ignored: ``expert`` names the activation.
        norm_layer: optional norm class on the hidden features (as in timm's Mlp; one norm shared
            by the experts).
        bias: per-expert biases on both projections (default False).
        drop: dropout after the activation and on the output.
        num_experts: E.
        k: experts per token for the selecting routers (default None: 2 for ``topk`` and
            ``task_aware``, all E for the dense routers, which reject any other k).
        router: a name of :data:`~gatezoo.blocks.routing.ROUTERS` or a ready
            :class:`~gatezoo.blocks.routing.Router` for ``in_features`` and ``num_experts``.
        router_args: keyword arguments of the router's class (``noisy``, ``tau``, ``num_tasks``...);
            a ``k`` there must agree with ``k`` (the experts' width follows the router's k), and
            ``dim`` and ``num_experts`` are refused (the layer's own arguments set them).
        expert: expert architecture, a name of :data:`EXPERTS` (default ``"swiglu"``).
        capacity_factor: None (dropless) or c > 0: every expert takes at most
            ``ceil(c * N * k / E)`` assignments of a forward with N tokens; the rest are dropped
            by the rule of :func:`~gatezoo.kernels.routing.make_plan` (first choices of all tokens
            before second choices, then by token order) and add nothing (the residual carries them).
        balance_coef: alpha of the Switch balance loss (default 0.01), used by the routers whose
            load can be unequal (``topk`` with k < E, ``modified_softmax`` with k < E,
            ``task_aware``, ``adaptive_threshold``); 0 turns it off.
        z_loss_coef: coefficient of the router z-loss (default 0: off; ST-MoE uses 1e-3), for
            routers with softmax logits.
        backend: ``"auto" | "torch" | "triton"`` for every op.
        device, dtype: factory arguments.

    Weights are stacked per expert: ``w1`` (E, d, 2h) for GLU experts (``[a | b]`` packed) or
    (E, d, h) for MLP experts, ``w2`` (E, h, d_out), each expert initialised like an
    ``nn.Linear``. After every forward, ``aux_loss`` holds the 0-dim auxiliary loss to add to the
    training loss (the router's own aux entries + ``balance_coef * switch`` + ``z_loss_coef *
    z``; a zero tensor when none applies), ``last_aux`` its parts and ``last_routing`` the
    :class:`~gatezoo.blocks.routing.RoutingResult`, both detached (for inspection). A
    ``copy.deepcopy`` or pickle of the layer gets ``aux_loss = None`` (the graph is not copied).
    Training forwards also update the load counters read by :func:`moe_stats` and, for a
    ``topk`` router with ``selection_bias=True``, the selection bias (from that batch's load,
    right after routing).

    ``forward(x, task_ids=None)``: x (..., d) -> (..., d_out); ``task_ids`` goes to the router
    (an int, one id per token of shape ``x.shape[:-1]``, or one per batch row).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=None, norm_layer=None, bias: bool = False, drop: float = 0.0, *, num_experts: int = 8,
                 k: int | None = None, router="topk", router_args: dict | None = None, expert: str = "swiglu",
                 capacity_factor: float | None = None, balance_coef: float = 0.01, z_loss_coef: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _positive_int("in_features", in_features)
        _positive_int("num_experts", num_experts)
        check_bool("bias", bias)
        check_probability("drop", drop)
        check_backend(backend)
        if norm_layer is not None and not callable(norm_layer):
            raise ArgumentTypeError(f"norm_layer must be a norm class (such as nn.LayerNorm) or None, got "
                                    f"{norm_layer!r}")
        kind, expanded, is_glu = _expert_kind(expert)
        if k is None and router in ("topk", "task_aware") and "k" not in (router_args or {}):
            k = min(2, num_experts)
        self._setup(_build_router(router, in_features, num_experts, k, router_args, backend, dd),
                    balance_coef, z_loss_coef, device)
        if capacity_factor is not None:
            if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
                raise ArgumentTypeError(f"capacity_factor must be None or a finite number > 0, got {capacity_factor!r} "
                                        f"({type(capacity_factor).__name__})")
            if not 0 < capacity_factor < math.inf:
                raise ValueError(f"capacity_factor must be None or a finite number > 0, got {capacity_factor!r}")
            capacity_factor = float(capacity_factor)
        if hidden_features is None:
            hidden_features = _round8(glu_hidden_features(in_features) // self.k if is_glu
                                      else 4 * in_features / self.k)
        _positive_int("hidden_features", hidden_features)
        out_features = in_features if out_features is None else _positive_int("out_features", out_features)
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.expert, self.kind, self.expanded, self.is_glu = expert, kind, expanded, is_glu
        self.capacity_factor, self.backend = capacity_factor, backend
        e, h = num_experts, hidden_features
        self.w1 = nn.Parameter(torch.empty(e, in_features, (2 if is_glu else 1) * h, **dd))
        self.w2 = nn.Parameter(torch.empty(e, h, out_features, **dd))
        self.b1 = nn.Parameter(torch.empty(e, (2 if is_glu else 1) * h, **dd)) if bias else None
        self.b2 = nn.Parameter(torch.empty(e, out_features, **dd)) if bias else None
        self.alpha = nn.Parameter(torch.zeros((), **dd)) if expanded else None
        self.norm = norm_layer(h, **dd) if norm_layer is not None else nn.Identity()
        self.drop1, self.drop2 = Dropout(drop), Dropout(drop)
        # pre-gating (see link_pregated): the next layer, the routing handed over, the event log
        object.__setattr__(self, "_pregate_next", None)
        # expert offloading (gatezoo.models.offload): the cache that serves this layer's experts
        object.__setattr__(self, "_offload", None)
        self._pending: RoutingResult | None = None
        self._events: list | None = None
        self._layer_index = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert like an ``nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def capacity(self, tokens: int) -> int | None:
        """Rows per expert for a forward of ``tokens`` tokens: ``ceil(c * N * k / E)``, or None."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.k / self.num_experts)

    def _log(self, what: str, layer: int) -> None:
        if self._events is not None:
            self._events.append((what, layer))

    def _route(self, x, task_ids):
        self._log("route", self._layer_index)
        return self.router(x, task_ids)

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        xf, lead, task_ids = self._tokens(x, task_ids)
        n = xf.shape[0]
        pending, self._pending = self._pending, None
        if pending is not None:
            if pending.weights.shape[0] != n:
                raise RuntimeError(f"the pre-gated routing handed to this layer covers {pending.weights.shape[0]} "
                                   f"tokens, but the layer got {n}")
            r = pending
        else:
            r = self._route(xf, task_ids)
        plan = make_plan(r.indices, self.num_experts, capacity=self.capacity(n), keep=r.keep)
        offload = getattr(self, "_offload", None)
        if offload is not None:  # reserve this layer's cached experts before the next one's prefetch
            offload.claim(self, plan)
        nxt = self._pregate_next
        if nxt is not None:  # pre-gating: the next layer's router runs on this layer's input, now
            nxt._pending = nxt._route(xf, task_ids)
            if getattr(nxt, "_offload", None) is not None:  # and its experts can be fetched ahead
                nxt._offload.prefetch(nxt, nxt._pending)
        self._after_routing(r, plan)
        self._log("experts", self._layer_index)
        y = self._experts(xf, r.weights, plan)
        return self.drop2(y).reshape(*lead, self.out_features)

    def _experts(self, xf: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        offload = getattr(self, "_offload", None)
        if offload is not None:
            return offload.run(self, xf, weights, plan)
        n = xf.shape[0]
        if plan.order.numel() == 0:
            return _no_rows(n, self.out_features, xf, weights)
        w1, w2, b1, b2 = self.w1, self.w2, self.b1, self.b2
        cast = _autocast_dtype(xf.device)
        if cast is not None:
            xf, w1, w2 = xf.to(cast), w1.to(cast), w2.to(cast)
            b1, b2 = (None if b is None else b.to(cast) for b in (b1, b2))
        if isinstance(self.norm, nn.Identity) and not (self.training and self.drop1.p > 0):
            # nothing between the two projections but the activation: the fused op
            return expert_ffn(xf, w1, w2, weights, plan, self.kind, glu=self.is_glu, alpha=self.alpha, b1=b1, b2=b2,
                              backend=self.backend)
        xs = permute(xf, plan, backend=self.backend)
        h = grouped_mm(xs, w1, plan.offsets, backend=self.backend)
        if b1 is not None:
            h = h + _row_bias(b1, plan)
        if self.is_glu:
            h = glu_packed(h, self.kind, self.alpha, backend=self.backend)
        else:
            h = gated_act(h, self.kind, self.alpha, backend=self.backend)
        h = self.drop1(self.norm(h)).to(w2.dtype)
        ys = grouped_mm(h, w2, plan.offsets, backend=self.backend)
        if b2 is not None:
            ys = ys + _row_bias(b2, plan)
        return unpermute(ys, weights, plan, backend=self.backend)

    def extra_repr(self) -> str:
        cap = "" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor:g}"
        return (f"{self.in_features}, hidden_features={self.hidden_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, k={self.k}, expert={self.expert!r}{cap}")


class MoLELinear(_MoEModule):
    """A linear layer plus a mixture of LoRA experts (AdaMoLE):
    ``y = base(x) + (alpha / rank) * sum_i w_i B_i A_i x``.

    Liu and Luo 2024, "AdaMoLE: Fine-Tuning Large Language Models with Adaptive Mixture of
    Low-Rank Adaptation Experts"; the LoRA experts follow Hu et al. 2022, "LoRA: Low-Rank
    Adaptation of Large Language Models". The router defaults to AdaMoLE's adaptive threshold;
    only the active (token, expert) pairs are computed (grouped matmuls over the dispatch plan),
    and a token with no active expert gets ``base(x)`` alone.

    Args:
        in_features, out_features: widths of the base linear layer ``base``.
        num_experts: E LoRA experts.
        rank: r, the LoRA rank.
        alpha: LoRA scaling numerator: the experts' sum is scaled by ``alpha / rank``.
        router: a name of :data:`~gatezoo.blocks.routing.ROUTERS` (default
            ``"adaptive_threshold"``) or a ready Router; ``router_args`` go to its class
            (``k`` included for the selecting routers).
        freeze_base: ``requires_grad=False`` on the base layer (fine-tuning only the adapters).
        bias: bias of the base layer.
        balance_coef, z_loss_coef: as in :class:`MoEFeedForward`, default 0 (AdaMoLE uses none).

    ``A`` (E, in, r) starts like LoRA's A (``U(-1/sqrt(in), 1/sqrt(in))``), ``B`` (E, r, out) at
    zero, so the layer starts as its base. :meth:`from_linear` wraps an existing ``nn.Linear``;
    ``weight`` and ``bias`` are the base layer's, so modules that read them from the layer it
    replaces keep working.
    """

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 4, rank: int = 8,
                 alpha: float = 16, router="adaptive_threshold", router_args: dict | None = None,
                 freeze_base: bool = False, bias: bool = True, balance_coef: float = 0.0, z_loss_coef: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        _positive_int("num_experts", num_experts)
        _positive_int("rank", rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ArgumentTypeError(f"alpha must be a finite number, got {alpha!r} ({type(alpha).__name__})")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        check_bool("freeze_base", freeze_base)
        check_bool("bias", bias)
        check_backend(backend)
        self._setup(_build_router(router, in_features, num_experts, None, router_args, backend, dd),
                    balance_coef, z_loss_coef, device)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = float(alpha) / rank
        self.backend = backend
        self.base = nn.Linear(in_features, out_features, bias=bias, **dd)
        if freeze_base:
            self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(num_experts, in_features, rank, **dd))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, rank, out_features, **dd))
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on LoRA's (r, in) A
        nn.init.uniform_(self.lora_a, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> MoLELinear:
        """A MoLELinear whose base layer is (a reference to) ``linear``'s parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        freeze = kwargs.pop("freeze_base", False)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        layer.base = linear
        if freeze:
            linear.requires_grad_(False)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for code that reads it from the linear layer this one replaced
        (as peft's LoRA layers show theirs)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None without one)."""
        return self.base.bias

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        xf, lead, task_ids = self._tokens(x, task_ids)
        r = self.router(xf, task_ids)
        plan = make_plan(r.indices, self.num_experts, keep=r.keep)
        self._after_routing(r, plan)
        y = self.base(xf)
        if plan.order.numel():
            a, b, xe = self.lora_a, self.lora_b, xf
            cast = _autocast_dtype(xf.device)
            if cast is not None:
                a, b, xe = a.to(cast), b.to(cast), xe.to(cast)
            xs = permute(xe, plan, backend=self.backend)
            h = grouped_mm(xs, a, plan.offsets, backend=self.backend)
            o = grouped_mm(h, b, plan.offsets, backend=self.backend)
            y = y + self.scaling * unpermute(o, r.weights, plan, backend=self.backend).to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, num_experts={self.num_experts}, rank={self.rank}, "
                f"scaling={self.scaling:g}")


# --- pre-gating --------------------------------------------------------------------------------


def link_pregated(layers: Sequence[MoEFeedForward], *, record_events: bool = False) -> list | None:
    """Pre-gating across a stack of MoE layers (Hwang et al. 2024, "Pre-gated MoE: An
    Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert Inference").

    After linking, layer l's forward also evaluates layer l+1's router on layer l's own input,
    before layer l's experts run, and hands that routing to layer l+1, which then skips its own
    router call (so layer l+1's experts are known one layer ahead and could be fetched while
    layer l computes). Layer 0 keeps its own gate. The layers must run in order, each once per
    step, on the same tokens (a layer that gets a different token count raises RuntimeError).

    With ``record_events=True`` the returned list receives ``("route", i)`` whenever a router of
    layer i is evaluated and ``("experts", i)`` whenever layer i's experts run; otherwise None.
    """
    check_bool("record_events", record_events)
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, MoEFeedForward):
            raise TypeError(f"layers[{i}] must be a MoEFeedForward, got {type(layer).__name__}")
    for i in range(len(layers) - 1):
        if layers[i + 1].router.dim != layers[i].in_features:
            raise ValueError(f"layers[{i + 1}]'s router takes {layers[i + 1].router.dim} features, but layers[{i}]'s "
                             f"input has {layers[i].in_features}: pre-gating needs equal widths")
    events = [] if record_events else None
    for i, layer in enumerate(layers):
        object.__setattr__(layer, "_pregate_next", layers[i + 1] if i + 1 < len(layers) else None)
        layer._layer_index, layer._events, layer._pending = i, events, None
    return events


def unlink_pregated(layers: Sequence[MoEFeedForward]) -> None:
    """Undo :func:`link_pregated`: every layer routes for itself again."""
    for layer in layers:
        object.__setattr__(layer, "_pregate_next", None)
        layer._events, layer._pending, layer._layer_index = None, None, 0


class PreGatedMoEStack(nn.Module):
    """MoE layers applied in sequence, ``x = x + layer(x)`` (or ``x = layer(x)`` with
    ``residual=False``), linked by :func:`link_pregated`; ``events`` is the event log when
    ``record_events=True`` (cleared at the start of every forward)."""

    def __init__(self, layers: Sequence[MoEFeedForward], *, residual: bool = True, record_events: bool = False):
        super().__init__()
        self.residual = check_bool("residual", residual)
        self.layers = nn.ModuleList(layers)
        self.events = link_pregated(self.layers, record_events=record_events)

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        if self.events is not None:
            self.events.clear()
        for layer in self.layers:
            x = x + layer(x, task_ids) if self.residual else layer(x, task_ids)
        return x


# --- model-level helpers ---------------------------------------------------------------------------


def _moe_modules(model: nn.Module):
    return [(name or type(m).__name__, m) for name, m in model.named_modules() if isinstance(m, _MoEModule)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of ``aux_loss`` over every MoE layer inside ``model`` (from their last forward),
    to add to the training loss; None when the model has no MoE layer that has run."""
    losses = [m.aux_loss for _, m in _moe_modules(model) if m.aux_loss is not None]
    if not losses:
        return None
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss.to(total.device)
    return total


def reset_moe_stats(model: nn.Module) -> None:
    """Zero the load counters of every MoE layer inside ``model``."""
    for _, m in _moe_modules(model):
        m.reset_stats()


def _layer_stats(m: _MoEModule) -> dict:
    load = m.stat_load.double().cpu()
    assignments = float(load.sum())
    tokens = int(m.stat_tokens)
    mean = float(load.mean())
    weight = m.stat_weight.double().cpu()
    weight_total = float(weight.sum())
    return {
        "tokens": tokens,
        "assignments": int(assignments),
        "load_share": (load / assignments).tolist() if assignments else [0.0] * load.numel(),
        "load_cv": float(load.std(unbiased=False)) / mean if mean else 0.0,
        "min_share": float(load.min()) / assignments if assignments else 0.0,
        "dropped_share": int(m.stat_dropped) / assignments if assignments else 0.0,
        "zero_expert_share": int(m.stat_zero) / tokens if tokens else 0.0,
        "weight_share": (weight / weight_total).tolist() if weight_total else [0.0] * weight.numel(),
        "min_weight_share": float(weight.min()) / weight_total if weight_total else 0.0,
    }


def moe_stats(model: nn.Module) -> dict:
    """Load statistics of the training forwards since the last :func:`reset_moe_stats`.

    Returns ``{"layers": {module name: stats}, "all": summary}``. Per layer: ``tokens``,
    ``assignments`` (routed (token, expert) pairs, before any capacity), ``load_share`` (each
    expert's share of them), ``load_cv`` (coefficient of variation std/mean of the per-expert
    loads, 0 when perfectly balanced), ``min_share`` (the least-loaded expert's share; 1/E when
    balanced), ``dropped_share`` (assignments dropped by the capacity / assignments),
    ``zero_expert_share`` (tokens left with no active expert / tokens), and ``weight_share`` /
    ``min_weight_share``: each expert's share of the routing weight given out (the gate's balance,
    which for a dense router, whose experts all see every token, is the measure that counts). ``all`` sums tokens,
    assignments, drops and zero-expert tokens over the layers and gives the mean and max
    ``load_cv`` and the smallest ``min_share`` and ``min_weight_share``.
    """
    layers = {name: _layer_stats(m) for name, m in _moe_modules(model)}
    dropped = sum(s["dropped_share"] * s["assignments"] for s in layers.values())
    zero = sum(s["zero_expert_share"] * s["tokens"] for s in layers.values())
    tokens = sum(s["tokens"] for s in layers.values())
    assignments = sum(s["assignments"] for s in layers.values())
    cvs = [s["load_cv"] for s in layers.values()]
    summary = {
        "layers": len(layers), "tokens": tokens, "assignments": assignments,
        "load_cv": sum(cvs) / len(cvs) if cvs else 0.0, "max_load_cv": max(cvs, default=0.0),
        "min_share": min((s["min_share"] for s in layers.values()), default=0.0),
        "min_weight_share": min((s["min_weight_share"] for s in layers.values()), default=0.0),
        "dropped_share": dropped / assignments if assignments else 0.0,
        "zero_expert_share": zero / tokens if tokens else 0.0,
    }
    return {"layers": layers, "all": summary}


def set_moe_process_group(model: nn.Module, group) -> None:
    """Make every MoE layer inside ``model`` sum its routing statistics over the processes of
    ``group`` (a ``torch.distributed`` process group; None: this process alone, the default) in
    training forwards: the load that moves a selection bias, the logged counters, and the balance
    and z-losses, which become each process's share of the global batch's losses times the world
    size (see ``_MoEModule._after_routing``), for data-parallel training whose gradients are
    averaged over the processes (DistributedDataParallel, FSDP). Every process must then run the
    same number of training forwards (one all-reduce per MoE layer each)."""
    for _, m in _moe_modules(model):
        m.process_group = group


def set_task_ids(model: nn.Module, task_ids) -> None:
    """Set the default ``task_ids`` of every MoE layer inside ``model`` (used by forwards that do
    not pass any, e.g. inside a timm model whose blocks cannot forward the argument); None clears."""
    for _, m in _moe_modules(model):
        m.task_ids = task_ids


class MoELayers:
    """The mixture-of-experts layers inside a model, as a training loop sees them: the one handle
    through which a loop adds their auxiliary losses, reads and resets their routing statistics,
    and tells them which processes to reduce over (see :func:`moe_layers`).

    It looks the layers up at each call, so it stays right when a wrapper (DDP, FSDP) or a
    method swaps modules. An instance is falsy for a model without MoE layers."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __bool__(self) -> bool:
        return bool(_moe_modules(self.model))

    def aux_loss(self) -> torch.Tensor | None:
        """The sum of the layers' auxiliary losses of their last forward (:func:`moe_aux_loss`)."""
        return moe_aux_loss(self.model)

    def stats(self, reset: bool = False) -> dict:
        """The load statistics since the last reset (:func:`moe_stats`); ``reset`` zeroes the
        counters after reading them."""
        out = moe_stats(self.model)
        if reset:
            reset_moe_stats(self.model)
        return out

    def reset(self) -> None:
        """Zero the layers' load counters (:func:`reset_moe_stats`)."""
        reset_moe_stats(self.model)

    def set_process_group(self, group) -> None:
        """Sum routing statistics and losses over ``group`` (:func:`set_moe_process_group`)."""
        set_moe_process_group(self.model, group)


def moe_layers(model: nn.Module) -> MoELayers:
    """The :class:`MoELayers` handle of ``model``: how the training loop (and any other) asks a
    model for its mixture-of-experts auxiliary loss and routing statistics."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return MoELayers(model)


# --- task-level sub-networks -------------------------------------------------------------------


def _task_level_router(layer: _MoEModule) -> TaskAwareRouter:
    """The layer's router when it routes by task alone, else a ValueError saying why not."""
    router = layer.router
    if isinstance(router, TaskAwareRouter) and router.task_level:
        return router
    how = (f"TaskAwareRouter with mode={router.mode!r} (token level)" if isinstance(router, TaskAwareRouter)
           else type(router).__name__)
    raise ValueError(f"layer routes with a {how}: its routing depends on the tokens, so it has no fixed sub-network "
                     f"per task; only task-level routing (router='task_aware' with router_args mode='task') can be "
                     f"extracted")


def _routing_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype the router computes in for inputs of the layer's own dtype."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class TaskExpertsFeedForward(nn.Module):
    """The sub-network of one task of a :class:`MoEFeedForward` with task-level routing, as a
    dense feed-forward: ``y = sum_j w_j f_{e_j}(x)`` over the k experts ``e_j`` the task selects,
    with the task's fixed weights ``w_j`` (Kudugunta et al. 2021, "Beyond Distillation:
    Task-level Mixture-of-Experts for Efficient Inference": the extracted task-MoE sub-network).

    Built by :func:`extract_task_experts`; its tensors are copies of the k experts' (``w1``
    (k, d, 2h) or (k, d, h), ``w2`` (k, h, d_out), the biases, the expanded activation's
    ``alpha``), the hidden norm and the dropouts are copies of the layer's, and
    ``combine_weights`` (k,) float32 holds ``w_j`` (what the router gives every token of the
    task). ``experts`` is the tuple of the original expert ids ``e_j``, ``task`` the task id.

    ``forward(x, task_ids=None)``: x (..., d) -> (..., d_out), no task ids needed. ``task_ids``
    is accepted where a MoE layer took it (e.g. inside a :class:`PreGatedMoEStack`): an int or
    an integer tensor whose ids must all be ``task`` (outside a torch.compile trace).
    """

    def __init__(self, layer: MoEFeedForward, task: int):
        super().__init__()
        if not isinstance(layer, MoEFeedForward):
            raise ArgumentTypeError(f"layer must be a MoEFeedForward, got {type(layer).__name__}")
        router = _task_level_router(layer)
        idx, weights = router.task_routing(task, _routing_dtype(layer.w1))
        self.task = int(task)
        self.experts = tuple(int(e) for e in idx)
        self.in_features, self.hidden_features, self.out_features = (layer.in_features, layer.hidden_features,
                                                                     layer.out_features)
        self.expert, self.kind, self.expanded, self.is_glu = layer.expert, layer.kind, layer.expanded, layer.is_glu
        self.backend = layer.backend
        with torch.no_grad():
            idx = idx.to(layer.w1.device)

            def pick(p):
                return None if p is None else nn.Parameter(p[idx].clone(), requires_grad=p.requires_grad)

            self.w1, self.w2, self.b1, self.b2 = (pick(p) for p in (layer.w1, layer.w2, layer.b1, layer.b2))
            self.alpha = None if layer.alpha is None else nn.Parameter(layer.alpha.clone(),
                                                                       requires_grad=layer.alpha.requires_grad)
        self.register_buffer("combine_weights", weights.to(layer.w1.device).clone())
        self.norm = copy.deepcopy(layer.norm)
        self.drop1, self.drop2 = copy.deepcopy(layer.drop1), copy.deepcopy(layer.drop2)
        self.train(layer.training)

    def _check_task_ids(self, task_ids) -> None:
        if task_ids is None:
            return
        if isinstance(task_ids, bool) or not isinstance(task_ids, (int, torch.Tensor)) or (
                isinstance(task_ids, torch.Tensor) and (task_ids.is_floating_point() or task_ids.is_complex()
                                                        or task_ids.dtype == torch.bool)):
            raise ArgumentTypeError(f"task_ids must be None, an int or an integer tensor, got "
                                    f"{getattr(task_ids, 'dtype', type(task_ids).__name__)}")
        if isinstance(task_ids, int):
            wrong = task_ids != self.task
        elif torch.compiler.is_compiling() or task_ids.numel() == 0:
            return  # reading the ids would sync with the device, which a trace cannot
        else:
            wrong = bool((task_ids != self.task).any())
        if wrong:
            raise ValueError(f"task_ids: this sub-network was extracted for task {self.task} alone, got ids other "
                             f"than {self.task}")

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got shape "
                             f"{tuple(x.shape)}")
        self._check_task_ids(task_ids)
        lead = tuple(x.shape[:-1])
        xf = x.reshape(-1, self.in_features)
        w1, w2, b1, b2 = self.w1, self.w2, self.b1, self.b2
        cast = _autocast_dtype(xf.device)
        if cast is not None:  # as MoEFeedForward does, so both compute in the same dtype
            xf, w1, w2 = xf.to(cast), w1.to(cast), w2.to(cast)
            b1, b2 = (None if b is None else b.to(cast) for b in (b1, b2))
        h = torch.matmul(xf, w1)  # (k, N, width): every token through each of the k experts
        if b1 is not None:
            h = h + b1.unsqueeze(1)
        if self.is_glu:
            h = glu_packed(h, self.kind, self.alpha, backend=self.backend)
        else:
            h = gated_act(h, self.kind, self.alpha, backend=self.backend)
        h = self.drop1(self.norm(h)).to(w2.dtype)
        ys = torch.matmul(h, w2)
        if b2 is not None:
            ys = ys + b2.unsqueeze(1)
        y = (self.combine_weights.to(ys.dtype).view(-1, 1, 1) * ys).sum(0)
        return self.drop2(y).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, hidden_features={self.hidden_features}, out_features={self.out_features}, "
                f"task={self.task}, experts={self.experts}, expert={self.expert!r}")


def _extract_mole(layer: MoLELinear, task: int) -> nn.Linear:
    """A task's sub-network of a MoLELinear: its LoRA experts merged into the base layer."""
    router = _task_level_router(layer)
    idx, weights = router.task_routing(task, _routing_dtype(layer.lora_a))
    base = layer.base
    linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        idx = idx.to(layer.lora_a.device)
        a, b = layer.lora_a[idx], layer.lora_b[idx]  # (k, in, r), (k, r, out)
        delta = torch.einsum("k,kir,kro->oi", weights.to(device=a.device, dtype=a.dtype), a, b) * layer.scaling
        linear.weight.copy_(base.weight + delta.to(base.weight.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.train(layer.training)


def extract_task_experts(layer: nn.Module, task) -> nn.Module:
    """The sub-network of task ``task`` of a MoE layer with task-level routing: a smaller dense
    module that computes what ``layer`` computes on that task's tokens, without a router and
    without task ids (Kudugunta et al. 2021, "Beyond Distillation: Task-level
    Mixture-of-Experts for Efficient Inference").

    ``layer``'s router must be a :class:`~gatezoo.blocks.routing.TaskAwareRouter` with
    ``mode="task"``: every token of a task then uses the same k experts with the same weights
    (:meth:`~gatezoo.blocks.routing.TaskAwareRouter.task_routing`). With any other router the
    routing depends on the tokens and a ValueError says so.

    * :class:`MoEFeedForward` -> :class:`TaskExpertsFeedForward`, the k experts of the task
      and their fixed weights (``k/E`` of the experts' parameters, no router).
    * :class:`MoLELinear` -> ``nn.Linear``: the base layer with the task's k LoRA experts merged
      in, ``W + (alpha/r)·sum_j w_j (A_j B_j)^T``.
    * A :class:`PreGatedMoEStack` is not one layer: :func:`gatezoo.models.extract_task_model`
      replaces the layers inside it (or inside any model); here it raises TypeError.

    The weights are computed in the routers' compute dtype for the layer's own dtype (float64
    for float64 parameters, else float32), the dtype its inputs normally have. The outputs equal
    the layer's on that task for a dropless layer; with a ``capacity_factor`` the layer drops
    assignments past an expert's capacity, which the sub-network (no capacity) computes. The
    copies are detached from ``layer`` (fine-tuning one leaves the other as it is).

    Raises TypeError for a ``task`` that is not an int (or 0-dim integer tensor) or a layer of
    another type, ValueError for a ``task`` outside ``[0, num_tasks)``.
    """
    if isinstance(layer, PreGatedMoEStack):
        raise ArgumentTypeError("layer must be a MoEFeedForward or a MoLELinear, got a PreGatedMoEStack: use "
                                "gatezoo.models.extract_task_model(stack, task), which replaces each layer inside it")
    if isinstance(layer, MoEFeedForward):
        return TaskExpertsFeedForward(layer, task)
    if isinstance(layer, MoLELinear):
        return _extract_mole(layer, task)
    raise ArgumentTypeError(f"layer must be a MoEFeedForward or a MoLELinear, got {type(layer).__name__}")
