"""Routers of mixture-of-experts layers, their result type and the auxiliary losses.

A router maps tokens ``x`` (N, d) to a :class:`RoutingResult`: for every token ``k`` expert
choices (``indices``), their combine weights, an optional mask of active choices, and what the
losses need (logits, probabilities). The MoE layers of :mod:`gatezoo.blocks.moe` turn it into a
dispatch plan with :func:`gatezoo.kernels.routing.make_plan`. The softmax, top-k and Gumbel
weights are computed by :func:`gatezoo.kernels.routing.route` (the fused kernel on GPU).

Routers (``ROUTERS`` names them; :func:`make_router` builds one by name):

========================  =====================================================================
``softmax``               dense softmax gate (Jacobs et al. 1991), every expert runs
``topk``                  sparse top-k softmax (Shazeer et al. 2017), optional noisy top-k and
                          an auxiliary-loss-free selection bias (DeepSeek-AI 2024, DeepSeek-V3)
``modified_softmax``      softmax over ``W_g M(x)`` with a bounded input transform ``M`` (Nguyen
                          et al. 2024, "A General Theory for Softmax Gating Multinomial Logistic
                          Mixture of Experts")
``gumbel``                Gumbel-softmax gate (Jang et al. 2017), dense, seeded sample mean in eval
``adaptive_threshold``    AdaMoLE's input-dependent threshold (Liu and Luo 2024)
``grkan``                 KAMoE's dense sigmoid gate from a gated residual KAN (Inzirillo and
                          Genet 2024)
``task_aware``            top-k over a task-conditioned gate (task embedding or one gate per task),
                          or over the task alone (task-level, Kudugunta et al. 2021)
========================  =====================================================================

The exact formulas are in docs/architecture.md, 'The math', section 'Routers and mixtures of
experts'; the user guide is docs/routing.md.

Dtypes: routers compute their logits in float32 (float64 for float64 input) with autocast off,
whatever the model's dtype; ``weights`` are always float32, ``logits`` and ``probs`` are in that
compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gatezoo.kernels.routing import route

from .checks import ArgumentTypeError, check_backend, check_bool, check_non_negative
from .kan import GRKAN, saved_grkan_structure

__all__ = [
    "ROUTERS", "AdaptiveThresholdRouter", "GRKANRouter", "GumbelSoftmaxRouter", "ModifiedSoftmaxRouter", "Router",
    "RoutingResult", "SoftmaxRouter", "TaskAwareRouter", "TopKRouter", "adamole_aux_loss", "make_router",
    "router_z_loss", "switch_balance_loss",
]


class RoutingResult(NamedTuple):
    """What a :class:`Router` returns for N tokens and E experts.

    weights: (N, k) float32 combine weights, 0 for inactive choices.
    indices: (N, k) int64 expert ids (dense routers: k = E, every expert once per token).
    keep: (N, k) bool mask of the active choices, or None when all k are active.
    logits: (N, E) router logits (what the z-loss uses), or None for routers without softmax
        logits (``grkan``).
    probs: (N, E) the router's probabilities, each row summing to 1 (the ``P`` of the balance
        loss).
    aux: name -> 0-dim tensor, auxiliary losses of the router itself, already multiplied by
        their coefficients (empty for the built-in routers except ``adaptive_threshold`` with
        ``aux_loss_coef > 0``, which gives ``"adamole"``; the MoE layer adds the balance and
        z-losses).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    keep: torch.Tensor | None
    logits: torch.Tensor | None
    probs: torch.Tensor
    aux: dict


# --- losses ----------------------------------------------------------------------------------


def switch_balance_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer load-balancing loss (Fedus et al. 2022), without its coefficient:
    ``E * sum_i f_i * P_i``.

    ``f_i = count_i / N`` is the share of the N tokens that have expert i among their choices:
    ``count_i`` counts the entries of ``indices`` equal to i where ``keep`` is true (the active
    choices, before any capacity drop). So ``sum_i f_i = k`` for k choices per token (the mean
    number of active choices per token with a ``keep`` mask); with k = 1 this is Switch's fraction
    of tokens, and for k > 1 it is the top-k form used e.g. by HF Mixtral's load-balancing loss.
    ``P_i`` is the mean of ``probs[:, i]`` over the N tokens. A uniform router with a uniform load
    gives exactly k. Only ``P`` carries a gradient. Zero when there are no tokens or no active
    choices.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[1] != num_experts:
        raise ValueError(f"probs must have shape (tokens, {num_experts}), got {tuple(getattr(probs, 'shape', ()))}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != probs.shape[0]:
        raise ValueError(f"indices must have shape ({probs.shape[0]}, k), got {tuple(getattr(indices, 'shape', ()))}")
    if keep is not None and (not isinstance(keep, torch.Tensor) or keep.shape != indices.shape):
        raise ValueError(f"keep must have indices' shape {tuple(indices.shape)}, got "
                         f"{tuple(getattr(keep, 'shape', ()))}")
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    ones = torch.ones(indices.shape, dtype=probs.dtype, device=probs.device) if keep is None else keep.to(probs.dtype)
    counts = probs.new_zeros(num_experts).scatter_add_(0, indices.reshape(-1).to(probs.device).long(), ones.reshape(-1))
    f = counts / probs.shape[0]
    return num_experts * (f * probs.mean(0)).sum()


def adamole_aux_loss(probs: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """AdaMoLE's auxiliary loss as the authors' code computes it, without its coefficient:
    ``E * sum_i f_i * mean_n (p_ni - tau_n)``, ``f_i`` the share of the N tokens with
    ``p_ni >= tau_n`` (a count, no gradient), the mean over all N tokens (see
    :class:`AdaptiveThresholdRouter`). ``probs`` (N, E), ``tau`` (N, 1). Zero for no tokens."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    shifted = probs - tau
    f = (shifted >= 0).to(probs.dtype).mean(0)
    return probs.shape[1] * (f * shifted.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """The router z-loss (Zoph et al. 2022, ST-MoE): ``mean over tokens of logsumexp(logits)^2``,
    without its coefficient; at least float32. Zero for no tokens."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must have shape (tokens, experts), got {tuple(getattr(logits, 'shape', ()))}")
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    z = logits if logits.dtype == torch.float64 else logits.float()
    return torch.logsumexp(z, dim=-1).square().mean()


# --- the base class --------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype routers compute in: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _all_experts(n: int, num_experts: int, device) -> torch.Tensor:
    return torch.arange(num_experts, device=device).repeat(n, 1)


def _dense(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, k) choices -> (N, E) with the weights at their experts (differentiable)."""
    return weights.new_zeros(indices.shape[0], num_experts).scatter(1, indices, weights)


class Router(nn.Module):
    """Base class: maps tokens (N, dim) to a :class:`RoutingResult` over ``num_experts`` experts.

    Attributes:
        dim: input width.
        num_experts: E.
        k: choices per token (E for dense routers and for the adaptive threshold).
        dense: True when every expert runs for every token (its weight may still be small).
        balance: True when the Switch balance loss makes sense (the load can be unequal).
    """

    balance = True

    def __init__(self, dim: int, num_experts: int, k: int | None, *, dense_only: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.dim = _check_int("dim", dim)
        self.num_experts = _check_int("num_experts", num_experts)
        name = type(self).__name__
        if k is None:
            k = num_experts
        _check_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got k={k}")
        if dense_only and k != num_experts:
            raise ValueError(f"k: {name} is dense (every expert runs), so k must be None or num_experts "
                             f"({num_experts}), got k={k}")
        self.k = k
        self.dense = k == num_experts
        self.backend = check_backend(backend)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (tokens, {self.dim}), got {tuple(x.shape)}")

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` in the router's compute dtype, autocast off."""
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            bias = None if layer.bias is None else layer.bias.to(dt)
            return F.linear(x.to(dt), layer.weight.to(dt), bias)

    def _topk(self, logits: torch.Tensor, probs: torch.Tensor | None = None, **route_args) -> RoutingResult:
        r = route(logits, self.k, backend=self.backend, **route_args)
        if probs is None:
            probs = torch.softmax(logits, dim=-1)
        return RoutingResult(r.weights, r.indices, None, logits, probs, {})

    def forward(self, x: torch.Tensor, task_ids=None) -> RoutingResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}"


# --- the routers -----------------------------------------------------------------------------


class SoftmaxRouter(Router):
    """Dense softmax gate, ``p = softmax(W_g x)``, ``y = sum_i p_i f_i(x)``: every expert runs.

    Jacobs, Jordan, Nowlan and Hinton 1991, "Adaptive Mixtures of Local Experts". No balance
    loss applies (every expert sees every token). ``k`` must be None or ``num_experts``.
    """

    balance = False

    def __init__(self, dim: int, num_experts: int, k: int | None = None, *, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__(dim, num_experts, k, dense_only=True, backend=backend)
        self.gate = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)

    def forward(self, x, task_ids=None):
        self._check_input(x)
        return self._topk(self._linear(self.gate, x))


SCORE_FUNCTIONS = ("softmax", "sigmoid")
"""The affinity scores of :class:`TopKRouter` (``score=``)."""
BIAS_TARGETS = ("scores", "logits")
"""What :class:`TopKRouter`'s selection bias is added to (``bias_on=``)."""


def _check_choice(name: str, value, choices: tuple) -> str:
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be one of {choices}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _score_probs(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Each row's affinity scores normalised to sum 1: ``softmax(l)``, or ``sigmoid(l) / sum
    sigmoid(l)`` (DeepSeek-V3's normalised sigmoid affinities, eq. 19; as a softmax of the
    log-sigmoid, which keeps its precision where every sigmoid underflows)."""
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    return torch.softmax(F.logsigmoid(logits), dim=-1)


class TopKRouter(Router):
    """Sparse top-k gate: only the k experts a token selects run, weighted by their affinity
    scores renormalised over the k.

    Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
    Mixture-of-Experts Layer" (top-k gating and its noisy variant); the selection bias follows
    DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (auxiliary-loss-free load balancing, eq. 16)::

        l = W_g x                                (noisy, training: l + eps * softplus(W_noise x))
        s = softmax(l)   or   sigmoid(l)         (score="softmax" | "sigmoid")
        S = the k largest of s + b               (bias_on="scores", the default)
        w_i = s_i / sum_{j in S} s_j, i in S     (the bias selects, it never weighs)

    With softmax scores ``w`` is the softmax over the k selected logits, Shazeer's gate; without
    a selection bias (``b = 0``) ``S`` is the k largest logits whatever the score.

    Args:
        dim, num_experts: widths.
        k: experts per token, 1 <= k <= num_experts (k = E is the dense softmax router).
        noisy: in training, select on ``l + eps * softplus(W_noise x)``, ``eps ~ N(0, 1)``; the
            weights are the scores of those noisy logits. ``W_noise`` starts at zero (noise of
            scale softplus(0) = 0.69). No noise in eval.
        selection_bias: keep a buffer ``b`` (E,), init 0, saved in the state dict: experts are
            selected by the top-k of ``s + b`` while the weights come from ``s`` alone.
            :meth:`update_bias` moves it towards under-loaded experts; the MoE layers call it in
            every training forward with that batch's load.
        bias_update_rate: ``u`` of the update ``b_i += u * sign(mean_load - load_i)`` (DeepSeek-V3's
            bias update speed gamma, 0.001 in the paper).
        score: ``"softmax"`` (default) or ``"sigmoid"`` (DeepSeek-V3's own choice), the affinity
            scores ``s``; ``probs`` is ``s`` normalised to sum 1 per token.
        bias_on: ``"scores"`` (default, the paper's rule) or ``"logits"``: select by the top-k of
            ``l + b`` instead, weights still from ``s`` alone. ``"logits"`` was gatezoo's rule
            before the paper's became the default (it selects other experts than the paper's rule
            once the bias is comparable to the gaps between scores); no measurement favours it.
        zero_init: start ``W_g`` at zero. None (default): True when ``noisy``, as Shazeer et al.
            initialise both ``W_g`` and ``W_noise`` to zero (no signal, only noise, at the start);
            False otherwise (``nn.Linear``'s init: a zero ``W_g`` without noise would send every
            token to the first k experts).
        backend: for :func:`gatezoo.kernels.routing.route`.

    Checkpoints: the buffer is still called ``selection_bias``, so a state dict saved while the
    bias was added to the logits loads unchanged, but the default rule now adds it to the
    scores. Its learned values are logit offsets; to compute what such a checkpoint computed,
    build the router with ``bias_on="logits"`` (``router_args={"selection_bias": True,
    "bias_on": "logits"}`` in a MoE layer or model config).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, noisy: bool = False, selection_bias: bool = False,
                 bias_update_rate: float = 1e-3, score: str = "softmax", bias_on: str = "scores",
                 zero_init: bool | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__(dim, num_experts, k, backend=backend)
        dd = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(dim, num_experts, bias=False, **dd)
        self.noisy = check_bool("noisy", noisy)
        check_bool("selection_bias", selection_bias)
        self.score = _check_choice("score", score, SCORE_FUNCTIONS)
        self.bias_on = _check_choice("bias_on", bias_on, BIAS_TARGETS)
        if zero_init is not None:
            check_bool("zero_init", zero_init)
        self.zero_init = noisy if zero_init is None else zero_init
        if self.zero_init:
            nn.init.zeros_(self.gate.weight)
        self.noise = nn.Linear(dim, num_experts, bias=False, **dd) if noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        self.bias_update_rate = _check_positive("bias_update_rate", bias_update_rate)
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.selection_bias = None
        self.balance = not self.dense

    def forward(self, x, task_ids=None):
        self._check_input(x)
        logits = self._linear(self.gate, x)
        select = logits
        if self.noisy and self.training:
            # added here (not through route's ``noise=``) so that W_noise gets its gradient
            select = logits + torch.randn_like(logits) * F.softplus(self._linear(self.noise, x))
        r = route(select, self.k, bias=self.selection_bias, score=self.score, bias_on=self.bias_on,
                  backend=self.backend)
        return RoutingResult(r.weights, r.indices, None, logits, _score_probs(select, self.score), {})

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """``b_i += u * sign(mean(counts) - counts_i)`` (no-op without ``selection_bias``).
        ``counts`` (E,) is the number of assignments each expert got in the last batch."""
        if self.selection_bias is None:
            return
        counts = counts.to(self.selection_bias.device, torch.float32)
        # out of place: the old tensor may still be referenced by a pending autograd graph
        self.selection_bias = self.selection_bias + self.bias_update_rate * torch.sign(counts.mean() - counts)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, noisy={self.noisy}, selection_bias={self.selection_bias is not None}, "
                f"score={self.score!r}, bias_on={self.bias_on!r}")


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softsign": F.softsign,
    "arctan": lambda x: torch.atan(x) * (2 / math.pi),
}
"""The bounded input transforms ``M`` of :class:`ModifiedSoftmaxRouter` by name."""


def _zero_gate_bias_if_missing(router: Router, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """For ``_load_from_state_dict``: a state dict saved before the router's gate had an
    intercept (``gate.weight`` without ``gate.bias``; module version < 2, or no version at all as
    in a safetensors file) loads with a zero intercept, which is exactly the function it computed.
    A version-2 state dict must have the bias (a missing one is the usual missing-key error)."""
    bias = router.gate.bias
    version = local_metadata.get("version")
    if bias is None or (version is not None and version >= 2):
        return
    if prefix + "gate.weight" in state_dict and prefix + "gate.bias" not in state_dict:
        state_dict[prefix + "gate.bias"] = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device)


class ModifiedSoftmaxRouter(Router):
    """Modified softmax gate: ``p = softmax(W_g M(x) + beta_0)`` with a fixed bounded transform
    ``M``.

    Nguyen, Akbarian, Nguyen and Ho 2024, "A General Theory for Softmax Gating Multinomial
    Logistic Mixture of Experts" (ICML): transforming the input with a bounded function before
    the softmax gate improves the sample efficiency of the gating parameters. The paper's gate
    is ``exp(beta_1i . M(x) + beta_0i) / sum_j exp(beta_1j . M(x) + beta_0j)``, so the gate has
    its intercept ``beta_0`` by default.

    Args:
        transform: ``"tanh"`` (default), ``"sigmoid"``, ``"softsign"`` (``x / (1 + |x|)``),
            ``"arctan"`` (``2 arctan(x) / pi``), or any callable tensor -> tensor of the same
            shape (it is applied as given, with no check that it is bounded).
        k: None or E (default) for the dense gate, or k < E for top-k selection over the
            modified logits.
        gate_bias: the intercept ``beta_0`` (E,) (default True, ``nn.Linear``'s init); False
            gives ``softmax(W_g M(x))``, the gate gatezoo had before.

    Checkpoints saved without the intercept load into the default router with ``beta_0 = 0``
    (the function they computed); see ``_zero_gate_bias_if_missing``.
    """

    _version = 2  # 2: the gate has an intercept by default

    def __init__(self, dim: int, num_experts: int, k: int | None = None, *, transform="tanh",
                 gate_bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__(dim, num_experts, k, backend=backend)
        if isinstance(transform, str):
            if transform not in TRANSFORMS:
                raise ValueError(f"transform must be one of {sorted(TRANSFORMS)} or a callable, got {transform!r}")
            self.transform_name, self.transform = transform, TRANSFORMS[transform]
        elif callable(transform):
            self.transform_name = getattr(transform, "__name__", type(transform).__name__)
            self.transform = transform
        else:
            raise TypeError(f"transform must be a name in {sorted(TRANSFORMS)} or a callable, got "
                            f"{type(transform).__name__}")
        self.gate = nn.Linear(dim, num_experts, bias=check_bool("gate_bias", gate_bias), device=device, dtype=dtype)
        self.balance = not self.dense

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        _zero_gate_bias_if_missing(self, state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x, task_ids=None):
        self._check_input(x)
        with torch.autocast(x.device.type, enabled=False):
            mx = self.transform(x.to(compute_dtype(x)))
        return self._topk(self._linear(self.gate, mx))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, transform={self.transform_name!r}, "
                f"gate_bias={self.gate.bias is not None}")


class GumbelSoftmaxRouter(Router):
    """Dense Gumbel-softmax gate: ``p = softmax((l + G) / tau)``, ``l = W_g x + b_g``,
    ``G ~ Gumbel(0, 1)``.

    Jang, Gu and Poole 2017, "Categorical Reparameterization with Gumbel-Softmax" (and Maddison
    et al. 2017, the Concrete distribution), used as a mixture-of-experts gate as in Chernov
    2025, "(GG) MoE vs. MLP on Tabular Data" (GG MoE), whose code (ChernovAndrey/tabmoe,
    ``GumbelGatingNetwork``) computes ``l`` with an ``nn.Linear`` that has a bias: so does this
    gate by default (``gate_bias``). In training one
    fresh sample per token (global RNG). In eval the mean over S = ``samples`` fixed noise
    vectors shared by every token: ``w = (1/S) sum_s softmax((l + G_s) / tau)`` with ``G`` (S, E)
    drawn in float32 from ``torch.Generator().manual_seed(seed)`` (a CPU generator, so the same
    noise on every device; cached after the first call). A token's eval output is therefore a
    deterministic function of that token alone: the same every call, whatever the global RNG,
    the batch around it or its position in the batch. Routers built with the same ``seed``
    (e.g. every layer of a model, with the default 0) use the same eval noise; give the layers
    different ``seed`` values for independent noise. As ``tau -> 0`` a sample tends to a
    one-hot vector.

    Args:
        tau: temperature, > 0.
        samples: S, number of noise samples averaged in eval (default 5).
        hard: straight-through: the forward uses the one-hot of the sample's argmax, the
            backward the soft sample's gradient (every expert still runs in training). In eval
            the one-hot of the argmax of the averaged sample, and only that expert runs.
        seed: seed of the eval noise (int >= 0, default 0).
        gate_bias: the gate's intercept ``b_g`` (E,) (default True, ``nn.Linear``'s init, as in
            the GG MoE code); False gives ``l = W_g x``, the gate gatezoo had before.
        k: None or ``num_experts`` (the gate is dense).

    ``probs`` is the (soft) mixture the weights come from: the sample in training, the mean of
    the samples in eval. No balance loss applies (dense). Checkpoints saved without the
    intercept load into the default router with ``b_g = 0`` (the function they computed).
    """

    balance = False
    _version = 2  # 2: the gate has an intercept by default

    def __init__(self, dim: int, num_experts: int, k: int | None = None, *, tau: float = 1.0, samples: int = 5,
                 hard: bool = False, seed: int = 0, gate_bias: bool = True, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__(dim, num_experts, k, dense_only=True, backend=backend)
        self.tau = _check_positive("tau", tau)
        self.samples = _check_int("samples", samples)
        self.seed = _check_int("seed", seed, 0)
        self.hard = check_bool("hard", hard)
        self.gate = nn.Linear(dim, num_experts, bias=check_bool("gate_bias", gate_bias), device=device, dtype=dtype)
        # the CPU draw, made here because torch.compile cannot trace creating a Generator, and a
        # cache of it on the device and dtype of the last eval forward
        self._noise_draw: tuple = self._draw_noise()
        self._eval_noise: tuple | None = None

    def _draw_noise(self) -> tuple:
        """``((seed, samples, E), (S, E) float32 CPU noise)``."""
        gen = torch.Generator().manual_seed(self.seed)
        g = -torch.empty(self.samples, self.num_experts).exponential_(generator=gen).log()
        return (self.seed, self.samples, self.num_experts), g

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        _zero_gate_bias_if_missing(self, state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def eval_noise(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The (S, E) Gumbel noise of eval forwards: ``-log(Exp(1))`` draws in float32 from
        ``torch.Generator().manual_seed(seed)``, then moved to ``device`` and cast to ``dtype``."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if self._noise_draw[0] != (self.seed, self.samples, self.num_experts):  # changed since the draw
            self._noise_draw, self._eval_noise = self._draw_noise(), None
        key = (device, dtype)
        if self._eval_noise is not None and self._eval_noise[0] == key:
            return self._eval_noise[1]
        g = self._noise_draw[1].to(device=device, dtype=dtype)
        if not torch.compiler.is_compiling():  # a trace keeps no tensor of its own for later calls
            self._eval_noise = (key, g)
        return g

    def forward(self, x, task_ids=None):
        self._check_input(x)
        logits = self._linear(self.gate, x)
        n, e = logits.shape
        if self.training:
            gumbel = -torch.empty_like(logits).exponential_().log()
            r = route(logits, e, noise=gumbel, scale=1.0 / self.tau, backend=self.backend)
            weights, indices, keep = r.weights, r.indices, None
            probs = _dense(indices, weights, e).to(logits.dtype)
            if self.hard:  # indices are by descending score: column 0 is the argmax
                one_hot = torch.zeros_like(weights)
                one_hot[:, 0] = 1
                weights = one_hot - weights.detach() + weights
        else:
            # the same S noise vectors for every token: (S, 1, E) broadcast over the N tokens
            g = self.eval_noise(logits.device, logits.dtype)
            gumbel = g.unsqueeze(1).expand(self.samples, n, e).reshape(self.samples * n, e)
            repeated = logits.unsqueeze(0).expand(self.samples, n, e).reshape(self.samples * n, e)
            r = route(repeated, e, noise=gumbel, scale=1.0 / self.tau, backend=self.backend)
            weights = _dense(r.indices, r.weights, e).view(self.samples, n, e).mean(0)
            probs = weights.to(logits.dtype)
            indices, keep = _all_experts(n, e, logits.device), None
            if self.hard:
                keep = F.one_hot(weights.argmax(-1), e).bool()
                weights = keep.float()
        return RoutingResult(weights, indices, keep, logits, probs, {})

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tau={self.tau}, samples={self.samples}, hard={self.hard}, seed={self.seed}, "
                f"gate_bias={self.gate.bias is not None}")


class AdaptiveThresholdRouter(Router):
    """AdaMoLE's adaptive threshold: a variable number of experts per token.

    Liu and Luo 2024, "AdaMoLE: Fine-Tuning Large Language Models with Adaptive Mixture of
    Low-Rank Adaptation Experts"::

        p      = softmax(W_g x)                        (no gate bias)
        tau(x) = tau_max * sigmoid(w_tau . x + b_tau)  tau_max = 1 / E by default
        w_i    = relu(p_i - tau) / sum_j relu(p_j - tau)

    A token with no ``p_i`` above its threshold gets all-zero weights (no active expert, so the
    layer falls back to its base or residual path). ``indices`` lists all E experts and ``keep``
    marks the active ones, so only those are dispatched. ``tau_max = 0`` fixes the threshold at 0
    (every expert, ``w = p``).

    The authors' auxiliary loss (their code, zefang-liu/AdaMoLE, ``AdaMoeLayer.get_layer_loss``,
    weighted by ``--aux_loss_coeff=1e-3`` in their training config) is an option,
    ``aux_loss_coef``::

        L = coef * E * sum_i f_i * mean_n (p_ni - tau_n)
        f_i = (1/N) * #{n : p_ni >= tau_n}      (no gradient: a count)

    The mean runs over all N tokens, those under the threshold included (their ``p - tau`` is
    negative), and ``p - tau`` keeps its gradient, to the gate and to the threshold network.
    It is returned as ``aux["adamole"]`` (coefficient applied), so a MoE layer adds it to its
    ``aux_loss``; set the layer's ``balance_coef=0`` (``MoLELinear``'s default) to train with the
    authors' loss alone. Computed on every forward, eval included (the authors only compute it
    when the input requires a gradient); under a process group each process's loss uses its own
    tokens, as the authors' per-device computation does.

    Args:
        tau_max: upper bound of the threshold, >= 0 (default ``1 / num_experts``).
        aux_loss_coef: the coefficient of the authors' auxiliary loss, >= 0 (default 0: off; the
            authors use 1e-3).
        k: None or ``num_experts`` (the number of active experts is decided per token).
    """

    def __init__(self, dim: int, num_experts: int, k: int | None = None, *, tau_max: float | None = None,
                 aux_loss_coef: float = 0.0, backend: str = "auto", device=None, dtype=None):
        super().__init__(dim, num_experts, k, dense_only=True, backend=backend)
        self.dense = False  # k = E slots, but only the active ones run
        if tau_max is None:
            tau_max = 1.0 / num_experts
        self.tau_max = check_non_negative("tau_max", tau_max)
        self.aux_loss_coef = check_non_negative("aux_loss_coef", aux_loss_coef)
        self.gate = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        self.threshold = nn.Linear(dim, 1, device=device, dtype=dtype)

    def forward(self, x, task_ids=None):
        self._check_input(x)
        logits = self._linear(self.gate, x)
        probs = torch.softmax(logits, dim=-1)
        tau = self.tau_max * torch.sigmoid(self._linear(self.threshold, x))
        excess = torch.relu(probs - tau)
        total = excess.sum(-1, keepdim=True)
        weights = excess / total.clamp_min(torch.finfo(total.dtype).tiny)
        keep = excess > 0
        indices = _all_experts(x.shape[0], self.num_experts, x.device)
        aux = {}
        if self.aux_loss_coef:
            aux["adamole"] = self.aux_loss_coef * adamole_aux_loss(probs, tau)
        return RoutingResult(weights.float(), indices, keep, logits, probs, aux)

    def extra_repr(self) -> str:
        extra = f", aux_loss_coef={self.aux_loss_coef:g}" if self.aux_loss_coef else ""
        return f"{super().extra_repr()}, tau_max={self.tau_max:g}{extra}"


class GRKANRouter(Router):
    """KAMoE's gate: dense sigmoid gates from a gated residual KAN,
    ``g = sigmoid(GRKAN(h))``, ``y = sum_i g_i f_i(x)``.

    Inzirillo and Genet 2024, "A Gated Residual Kolmogorov-Arnold Networks for Mixtures of
    Experts", which introduces KAMoE. By default (``structure="paper"``) the gate is the paper's
    and the authors' code's (github.com/remigenet/KAMoE, ``kamoe/kamoe.py`` and ``grkan.py``)::

        h        = ReLU(W_d x + b_d)                                (dim -> dense_width)
        GRKAN(h) = LayerNorm(W_s h + b_s + GLU(eta)),  eta = KAN2(KAN1(h))
        GLU(eta) = sigmoid(W_4 eta + b_4) * (W_5 eta + b_5)

    with ``KAN1: dense_width -> hidden`` (ELU base), ``KAN2: hidden -> hidden`` (SiLU base) and
    the GLU and skip mapping to the E experts (:class:`~gatezoo.blocks.kan.GRKAN` has the
    formulas; ``self.grkan(x)`` is ``GRKAN(h)``, the input layer included).
    ``structure="compact"`` is gatezoo's earlier gate, ``g = sigmoid(LayerNorm(W_s x +
    a * sigmoid(b)))``, ``[a | b] = KAN2(KAN1(x))``, with no input layer, no skip bias and no
    affine GLU maps; build it to load a checkpoint saved before the paper's structure became
    the default (loading one into the paper's structure fails and says so).

    The gates are **not** renormalised: each lies in (0, 1) and they need not sum to 1, as in
    the paper. ``probs`` is ``g / sum(g)`` (for statistics only); ``logits`` is None (no softmax,
    so no z-loss) and no balance loss applies (dense). Like every router it computes in float32
    (float64 for float64 input) with autocast off, casting its parameters when they have another
    dtype.

    Args:
        structure: ``"paper"`` (default) or ``"compact"``.
        dense_width: ``"paper"`` only: width of the input layer ``h`` (default ``dim``: the
            authors' code uses the experts' output width, which is ``dim`` for gatezoo's
            feed-forward experts; it costs ``dim * dense_width`` multiply-adds per token).
        hidden: width between the KAN layers (default ``num_experts`` for ``"paper"``, the
            authors' choice, and ``2 * num_experts`` for ``"compact"``: a KAN layer costs about
            ``(grid_size + spline_order + 1) * in * out`` multiply-adds per token, so a hidden
            width of ``dim`` would cost more than the experts).
        dropout: ``"paper"`` only: dropout rate on ``eta`` in training (default 0).
        k: None or ``num_experts``.
        **kan_args: ``basis``, ``grid_size``, ``spline_order``, ``grid_range``, ``base_activation``
            ... of :class:`~gatezoo.blocks.kan.GRKAN`.
    """

    balance = False

    def __init__(self, dim: int, num_experts: int, k: int | None = None, *, structure: str = "paper",
                 dense_width: int | None = None, hidden: int | None = None, backend: str = "auto", device=None,
                 dtype=None, **kan_args):
        super().__init__(dim, num_experts, k, dense_only=True, backend=backend)
        if structure == "paper":
            dense_width = dim if dense_width is None else dense_width
            hidden = num_experts if hidden is None else hidden
        elif structure == "compact":
            hidden = 2 * num_experts if hidden is None else hidden
        # GRKAN checks structure, dense_width and hidden and names them in its errors
        self.grkan = GRKAN(dim, hidden, num_experts, structure=structure, dense_width=dense_width, device=device,
                           dtype=dtype, backend=backend, **kan_args)
        self.structure = structure

    def forward(self, x, task_ids=None):
        self._check_input(x)
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            # in the compute dtype like every router: parameters of another dtype (a bf16 model)
            # are cast on use, differentiably, so their gradients keep the parameters' dtype
            cast = {name: p.to(dt) for name, p in self.grkan.named_parameters() if p.dtype != dt}
            xd = x.to(dt)
            out = functional_call(self.grkan, cast, (xd,)) if cast else self.grkan(xd)
            gates = torch.sigmoid(out)
        indices = _all_experts(x.shape[0], self.num_experts, x.device)
        probs = gates / gates.sum(-1, keepdim=True)
        return RoutingResult(gates.float(), indices, None, None, probs, {})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checked here, before GRKAN's own check, so the message says how to build the router
        saved = saved_grkan_structure(state_dict, f"{prefix}grkan.")
        if saved is not None and saved != self.structure:
            where = f" at {prefix!r}" if prefix else ""
            if saved == "compact":
                why = ("it was saved with the compact GRKAN structure, the default before the paper's structure "
                       "(h = ReLU(Dense(x)), LayerNorm(W_s h + b_s + GLU(KAN2(KAN1(h))))) became the default")
            else:
                why = "it was saved with the paper's GRKAN structure (the default)"
            raise ValueError(f"GRKANRouter state dict{where}: {why}, but this router has structure="
                             f"{self.structure!r}. Build the router with structure={saved!r} to load it: "
                             f"GRKANRouter(dim, num_experts, structure={saved!r}), or in a model's MoE options "
                             f"router_args={{'structure': {saved!r}}}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, structure={self.structure!r}"


class TaskAwareRouter(Router):
    """Top-k routing conditioned on a task id (multi-task models), at token or at task level.

    Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts for Efficient
    Inference" (routing by task), in three forms:

    * ``mode="embed"`` (token level): the gate sees ``[x ; e_task]``, with ``e_task`` a learned
      embedding per task (``task_dim`` wide, default ``dim``): ``l = W_g [x ; e_task]``.
    * ``mode="per_task"`` (token level): one gate matrix per task, ``l = W_g[task] x``.
    * ``mode="task"`` (task level, the paper's task-MoE): the gate sees the task alone,
      ``l_t = W_g e_t`` with ``e_t`` a learned embedding of task t (``task_dim`` wide, default
      ``dim``) and ``W_g`` (E, task_dim), as the authors' GShard/Lingvo code gates on task
      embeddings (``TaskTop2Gating``: ``logits = task_embeddings @ w``). Every token of task t
      gets the same k experts, the top k of ``l_t``, and the same weights; ``x`` only sets the
      number of tokens and the compute dtype. So a task's sub-network is fixed and can be
      extracted (:meth:`task_routing`, :func:`gatezoo.blocks.moe.extract_task_experts`).

    The weights are the top-k softmax of those logits, as in :class:`TopKRouter`. For the
    auxiliary losses every token carries its task's logits and probabilities: in ``mode="task"``
    the Switch balance loss has ``f_i`` = the share of tokens whose task selects expert i and
    ``P_i`` = the token-weighted mean of the tasks' ``softmax(l_t)_i``, so it balances the
    experts over the batch's mix of tasks (its gradient reaches ``W_g`` and the task embeddings
    through ``P``); the z-loss is the token-weighted mean of ``logsumexp(l_t)^2``.

    Args:
        num_tasks: T, task ids lie in ``[0, T)``.
        k: experts per token.
        mode: ``"embed"`` (default), ``"per_task"`` or ``"task"``.
        task_dim: width of the task embedding (``"embed"`` and ``"task"``; default ``dim``).

    ``forward(x, task_ids)`` requires ``task_ids``: an int (every token) or an integer tensor of
    shape () or (N,) (one id per token; the MoE layers also accept one per batch row).
    """

    MODES = ("embed", "per_task", "task")

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, num_tasks: int, mode: str = "embed",
                 task_dim: int | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__(dim, num_experts, k, backend=backend)
        dd = {"device": device, "dtype": dtype}
        self.num_tasks = _check_int("num_tasks", num_tasks)
        if not isinstance(mode, str):
            raise ArgumentTypeError(f"mode must be one of {self.MODES}, got {type(mode).__name__}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode in ("embed", "task"):
            self.task_dim = dim if task_dim is None else _check_int("task_dim", task_dim)
            self.task_embed = nn.Embedding(num_tasks, self.task_dim, **dd)
            gate_in = self.task_dim if mode == "task" else dim + self.task_dim
            self.gate = nn.Linear(gate_in, num_experts, bias=False, **dd)
        else:
            if task_dim is not None:
                raise ValueError("task_dim is only used by mode='embed' and mode='task'")
            self.task_dim = None
            bound = 1 / math.sqrt(dim)  # nn.Linear's default init, per task
            self.gate_weight = nn.Parameter(torch.empty(num_tasks, num_experts, dim, **dd).uniform_(-bound, bound))
        self.balance = not self.dense

    @property
    def task_level(self) -> bool:
        """True when the routing depends on the task alone (``mode="task"``)."""
        return self.mode == "task"

    def task_index(self, task_ids, n: int, device) -> torch.Tensor:
        """``task_ids`` checked and expanded to (n,) int64."""
        if task_ids is None:
            raise ValueError(f"task_ids is required by {type(self).__name__} (num_tasks={self.num_tasks}): pass an "
                             f"int or an integer tensor of shape () or ({n},)")
        if isinstance(task_ids, bool):
            raise TypeError("task_ids must be an int or an integer tensor, got bool")
        if isinstance(task_ids, int):
            task_ids = torch.tensor(task_ids)
        if not isinstance(task_ids, torch.Tensor) or task_ids.is_floating_point() or task_ids.is_complex() \
                or task_ids.dtype == torch.bool:
            raise TypeError(f"task_ids must be an int or an integer tensor, got "
                            f"{getattr(task_ids, 'dtype', type(task_ids).__name__)}")
        if task_ids.dim() == 0 or task_ids.shape == (1,):
            task_ids = task_ids.reshape(()).expand(n)
        elif task_ids.shape != (n,):
            raise ValueError(f"task_ids must have shape () or ({n},) (one id per token), got {tuple(task_ids.shape)}")
        # the value check reads the device, which a torch.compile trace cannot (ids are trusted there)
        if n and not torch.compiler.is_compiling() and (int(task_ids.min()) < 0
                                                        or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}) (num_tasks={self.num_tasks}), got values "
                             f"in [{int(task_ids.min())}, {int(task_ids.max())}]")
        return task_ids.to(device=device, dtype=torch.int64)

    def task_logits(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``mode="task"`` only: the (T, E) logits ``l_t = W_g e_t`` of every task, computed in
        ``dtype`` (float32 or float64, what :func:`compute_dtype` gives for the input) with
        autocast off."""
        if not self.task_level:
            raise ValueError(f"task_logits needs mode='task' (task-level routing), this router has mode={self.mode!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (a router's compute dtype), got {dtype}")
        emb = self.task_embed.weight
        with torch.autocast(emb.device.type, enabled=False):
            return F.linear(emb.to(dtype), self.gate.weight.to(dtype))

    def task_routing(self, task: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``mode="task"`` only: ``(indices, weights)`` of task ``task``, its k experts (int64,
        (k,), best first) and their float32 combine weights (k,), which every token of the task
        gets; ``dtype`` is the compute dtype of the logits (float64 for float64 inputs). Detached:
        for inspection and extraction."""
        task = _check_task_id(task, self.num_tasks)
        with torch.no_grad():  # every task routed, as forward does, so the rows are forward's
            r = route(self.task_logits(dtype), self.k, backend=self.backend)
        return r.indices[task], r.weights[task]

    def forward(self, x, task_ids=None):
        self._check_input(x)
        tasks = self.task_index(task_ids, x.shape[0], x.device)
        dt = compute_dtype(x)
        if self.mode == "task":
            # route the T tasks once, then hand each token its task's row: every token of a task
            # gets the same experts and weights by construction
            per_task = self.task_logits(dt)
            r = route(per_task, self.k, backend=self.backend)
            probs = torch.softmax(per_task, dim=-1)
            return RoutingResult(r.weights[tasks], r.indices[tasks], None, per_task[tasks], probs[tasks], {})
        if self.mode == "embed":
            with torch.autocast(x.device.type, enabled=False):
                emb = self.task_embed.weight.to(dt)[tasks]
            logits = self._linear(self.gate, torch.cat([x.to(dt), emb], dim=-1))
        else:
            with torch.autocast(x.device.type, enabled=False):
                w = self.gate_weight.to(dt)
                every = F.linear(x.to(dt), w.reshape(-1, self.dim)).view(-1, self.num_tasks, self.num_experts)
                logits = every.gather(1, tasks.view(-1, 1, 1).expand(-1, 1, self.num_experts)).squeeze(1)
        return self._topk(logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_tasks={self.num_tasks}, mode={self.mode!r}"


def _check_task_id(task, num_tasks: int) -> int:
    """One task id: an int (or a 0-dim integer tensor) in ``[0, num_tasks)``."""
    if isinstance(task, torch.Tensor) and task.dim() == 0 and not task.is_floating_point() \
            and not task.is_complex() and task.dtype != torch.bool:
        task = int(task)
    if isinstance(task, bool) or not isinstance(task, int):
        raise ArgumentTypeError(f"task must be an int (a task id in [0, {num_tasks})), got "
                                f"{getattr(task, 'dtype', type(task).__name__)}")
    if not 0 <= task < num_tasks:
        raise ValueError(f"task must lie in [0, {num_tasks}) (num_tasks={num_tasks}), got {task}")
    return task


ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "topk": TopKRouter,
    "modified_softmax": ModifiedSoftmaxRouter,
    "gumbel": GumbelSoftmaxRouter,
    "adaptive_threshold": AdaptiveThresholdRouter,
    "grkan": GRKANRouter,
    "task_aware": TaskAwareRouter,
}
"""Router names -> classes, for :func:`make_router` and the MoE layers' ``router=`` argument."""


def make_router(name: str, dim: int, num_experts: int, k: int | None = None, **kwargs) -> Router:
    """Build the router ``name`` of :data:`ROUTERS` for inputs of width ``dim``.

    ``k=None`` takes the router's default (2 for ``topk`` and ``task_aware``, all experts for
    the others); other keyword arguments go to the router's class. Errors name the argument:
    an unknown name lists the choices, ``k`` outside ``[1, num_experts]`` (or ``k != E`` for a
    dense router), ``tau <= 0`` and so on raise ``ValueError``; wrong types ``TypeError``.
    """
    if not isinstance(name, str):
        raise TypeError(f"router must be a name in {sorted(ROUTERS)}, got {type(name).__name__}")
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}")
    if k is not None:
        kwargs["k"] = k
    return ROUTERS[name](dim, num_experts, **kwargs)
