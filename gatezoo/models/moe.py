"""The mixture-of-experts options every model config shares, and the feed-forward they build.

A model whose ``ffn`` is ``"moe"`` replaces each dense feed-forward by a
:class:`gatezoo.blocks.MoEFeedForward` configured by the fields of :class:`MoEOptions`. The
experts are sized so that a token's active parameters match the dense GLU feed-forward the model
would otherwise use: each expert's hidden width is the GLU width divided by the number of experts a
token uses (k for the selecting routers, all E for the dense ones), rounded up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gatezoo.blocks import ROUTERS, MoEFeedForward, link_pregated
from gatezoo.blocks.checks import ArgumentTypeError, check_bool, check_int, check_str

# routers that pick k experts per token (default 2); the others weigh every expert (k = E)
_SELECTING = ("topk", "task_aware")
# routers that take a k below E: the selecting ones, and modified_softmax (dense by default)
_TAKES_K = (*_SELECTING, "modified_softmax")
# router_args keys that name what other fields (or the model) already set: one source of truth
_SET_ELSEWHERE = {
    "k": "moe_k (the experts' width is chosen from it)",
    "num_experts": "the num_experts field",
    "dim": "the model's width (dim)",
}


@dataclass
class MoEOptions:
    """Mixture-of-experts fields of a model config (used when ``ffn="moe"``).

    num_experts: E.
    moe_k: experts per token for the ``topk`` and ``task_aware`` routers (None: 2) and for
        ``modified_softmax`` (None: all E, the dense gate; k < E selects the top k); the dense
        routers (``softmax``, ``gumbel``, ``grkan``, ``adaptive_threshold``) take every expert and
        reject any other value. The experts' width is chosen from it.
    router: a name of :data:`gatezoo.blocks.ROUTERS`. ``task_aware`` needs task ids on every
        forward: a ViT gets them from :func:`gatezoo.blocks.set_task_ids`; the translation model
        takes them as ``task_ids`` of ``forward`` and ``encode`` (see
        :class:`~gatezoo.models.translation.EncoderDecoder`).
    router_args: keyword arguments of the router (``noisy``, ``selection_bias``, ``tau``, ...);
        not ``k``, ``num_experts`` or ``dim``, which the other fields set.
    moe_expert: the experts' architecture (a GLU name such as ``swiglu``, or ``mlp-<activation>``).
    capacity_factor: None (dropless) or c > 0 (each expert takes at most ceil(c N k / E) tokens).
    balance_coef: alpha of the Switch load-balance loss (0.01).
    z_loss_coef: coefficient of the router z-loss (0: off).
    pregated: layer l evaluates the router of layer l + 1 (Pre-gated MoE), per stack of layers.

    These fields apply only with ``ffn="moe"``: :meth:`reject_unused_moe` refuses any of them
    set to something other than its default with another feed-forward.
    """

    num_experts: int = 8
    moe_k: int | None = None
    router: str = "topk"
    router_args: dict = field(default_factory=dict)
    moe_expert: str = "swiglu"
    capacity_factor: float | None = None
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    pregated: bool = False

    def validate_moe(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first MoE field that is out of
        range (only when ffn is moe)."""
        check_int("num_experts", self.num_experts)
        check_str("router", self.router)
        check_str("moe_expert", self.moe_expert)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.moe_k is not None:
            k = self.moe_k
            if isinstance(k, bool) or not isinstance(k, int):
                raise ArgumentTypeError(f"moe_k must be an int in [1, num_experts={self.num_experts}] or null, "
                                        f"got {k!r} ({type(k).__name__})")
            if not 1 <= k <= self.num_experts:
                raise ValueError(f"moe_k must be an int in [1, num_experts={self.num_experts}] or null, "
                                 f"got {self.moe_k!r}")
            if self.router not in _TAKES_K and self.moe_k != self.num_experts:
                raise ValueError(f"moe_k={self.moe_k} needs a selecting router ({_TAKES_K}); router "
                                 f"{self.router!r} weighs all {self.num_experts} experts")
        if not isinstance(self.router_args, dict):
            raise ArgumentTypeError(f"router_args must be a mapping, got {self.router_args!r}")
        for key in self.router_args:
            if key in _SET_ELSEWHERE:
                raise ValueError(f"router_args must not set {key!r} (got {key}={self.router_args[key]!r}): it is "
                                 f"given by {_SET_ELSEWHERE[key]}")
        check_bool("pregated", self.pregated)
        for name in ("balance_coef", "z_loss_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ArgumentTypeError(f"{name} must be a number >= 0, got {v!r} ({type(v).__name__})")
            if not 0 <= v < math.inf:
                raise ValueError(f"{name} must be a number >= 0 (and finite), got {v!r}")
        c = self.capacity_factor
        if c is not None:
            if isinstance(c, bool) or not isinstance(c, (int, float)):
                raise ArgumentTypeError(f"capacity_factor must be null (dropless) or a finite number > 0, got {c!r} "
                                        f"({type(c).__name__})")
            if not 0 < c < math.inf:
                raise ValueError(f"capacity_factor must be null (dropless) or a finite number > 0, got {c!r}")

    def reject_unused_moe(self) -> None:
        """Raise ValueError when the config's ``ffn`` is not ``"moe"`` but a mixture-of-experts
        field differs from its default: it would be silently ignored."""
        ffn = getattr(self, "ffn", None)
        if ffn == "moe":
            return
        for f in dataclasses.fields(MoEOptions):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            value = getattr(self, f.name)
            if value != default:  # equal values count as the default (z_loss_coef: 0 for 0.0)
                raise ValueError(f"{f.name}={value!r} only applies with ffn='moe', got ffn={ffn!r}; set ffn='moe' "
                                 f"or leave {f.name} at its default ({default!r})")

    @property
    def experts_per_token(self) -> int:
        """k for the selecting routers (``moe_k``, default 2), ``moe_k`` or E for
        ``modified_softmax``, E for the dense ones."""
        if self.moe_k is not None:
            return self.moe_k
        return min(2, self.num_experts) if self.router in _SELECTING else self.num_experts


def moe_feedforward(opts: MoEOptions, dim: int, dense_glu_hidden: int, drop: float) -> MoEFeedForward:
    """The MoE feed-forward of ``opts`` for width ``dim``, its experts sized so that a token's
    active parameters match a dense GLU of hidden width ``dense_glu_hidden``."""
    k = opts.experts_per_token
    hidden = -(-dense_glu_hidden // k)  # ceil; no rounding to tiles, which would add 12% at k = 8 here
    return MoEFeedForward(dim, hidden, drop=drop, num_experts=opts.num_experts,
                          k=opts.moe_k if opts.router in _TAKES_K else None, router=opts.router,
                          router_args=dict(opts.router_args), expert=opts.moe_expert,
                          capacity_factor=opts.capacity_factor, balance_coef=opts.balance_coef,
                          z_loss_coef=opts.z_loss_coef)


def link_stack(opts: MoEOptions, ffns: list[nn.Module]) -> None:
    """Link one stack of MoE feed-forwards for pre-gating when ``opts.pregated``."""
    if opts.pregated and len(ffns) > 1:
        link_pregated(ffns)


def inside_moe(model: nn.Module) -> set[int]:
    """``id`` of every module inside a :class:`~gatezoo.blocks.MoEFeedForward` of ``model`` (its
    router's layers), which a model's weight initialisation leaves to the router's own."""
    return {id(sub) for m in model.modules() if isinstance(m, MoEFeedForward) for sub in m.modules()}


def init_experts(model: nn.Module, init: Callable[[torch.Tensor], object]) -> None:
    """Initialise every expert of every MoE layer of ``model`` like the dense layer it stands
    for: ``init`` on each expert's (in, out) matrices, zero biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEFeedForward):
                for w in (m.w1, m.w2):
                    for e in range(w.shape[0]):
                        init(w[e])
                for b in (m.b1, m.b2):
                    if b is not None:
                        b.zero_()
