"""Feed-forward blocks: gated activations, GLU feed-forwards and the plain MLP baseline.

``GLUFeedForward`` and ``Mlp`` take timm's MLP signature (``in_features, hidden_features,
out_features, act_layer, norm_layer, bias, drop``), so either plugs into
``timm.models.vision_transformer.VisionTransformer(mlp_layer=...)``.

Arguments are checked (:mod:`gatezoo.blocks.checks`): sizes are positive ints (None, not 0,
asks for the default), ``bias`` and ``expanded`` are bools, ``drop`` is in [0, 1); the forward
takes a floating-point tensor (..., in_features) of the parameters' dtype.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from gatezoo.kernels import KINDS, gated_act, glu_packed

from .checks import (
    ArgumentTypeError,
    check_backend,
    check_bool,
    check_features,
    check_int,
    check_optional_int,
    check_probability,
    check_str,
)
from .dropout import Dropout

# timm passes an activation class (torch's or timm's own of the same name); a GLU reads it as
# the gate it should use.
_ACT_TO_KIND = {"GELU": "gelu", "SiLU": "silu", "Swish": "silu", "ReLU": "relu", "Sigmoid": "sigmoid",
                "Identity": "identity"}


def _kind_from_act_layer(act_layer) -> str:
    """The GLU kind an activation class stands for (``nn.GELU`` -> ``"gelu"``, ...)."""
    if isinstance(act_layer, str):
        name = {k.lower(): k for k in _ACT_TO_KIND}.get(act_layer.lower(), act_layer)
    else:
        while isinstance(act_layer, functools.partial):
            act_layer = act_layer.func
        name = getattr(act_layer, "__name__", type(act_layer).__name__)
    if name not in _ACT_TO_KIND:
        raise ValueError(
            f"act_layer {act_layer!r} has no GLU gate (known: {sorted(_ACT_TO_KIND)}); "
            f"pass kind= one of {sorted(KINDS)} instead"
        )
    return _ACT_TO_KIND[name]

# GLU names -> (kernel kind, expanded). The families follow the x-activation code (Huang 2024):
# a gate g in {sigmoid (SwiGLU family), Phi (GEGLU), arctan/pi + 1/2 (ATGLU)}, an order (1:
# g(a) * b, 2: a * g(a) * b) and the expansion g -> expand(g, alpha). Every name here says its order;
# the short names keep their usual meaning (glu: sigmoid, order 1; swiglu / geglu / atglu: order 2,
# which is also x-activation's default for ATGLU). See docs/activation.md for the full table.
GLU_VARIANTS = {
    "glu": ("sigmoid", False), "xglu": ("sigmoid", True),
    "swiglu1": ("sigmoid", False), "xswiglu1": ("sigmoid", True),
    "swiglu": ("silu", False), "swiglu2": ("silu", False), "xswiglu2": ("silu", True),
    "geglu1": ("normcdf", False), "xgeglu1": ("normcdf", True),
    "geglu": ("gelu", False), "geglu2": ("gelu", False), "xgeglu2": ("gelu", True),
    "atglu1": ("arctan", False), "xatglu1": ("arctan", True),
    "atglu": ("atlu", False), "atglu2": ("atlu", False), "xatglu2": ("atlu", True),
    "bilinear": ("identity", False), "reglu": ("relu", False),
}

# Names without an order, resolved by the ``order`` argument. The expanded ones meant second
# order in gatezoo 0.1 while x-activation's XSwiGLU / XGEGLU / XATGLU default to first order, so
# they still mean second order but warn unless ``order`` is given.
GLU_FAMILIES = {"swiglu": 2, "geglu": 2, "atglu": 2, "xswiglu": None, "xgeglu": None, "xatglu": None}
_LEGACY = {"xnormglu": "xgeglu1"}


def _check_common(bias, drop, norm_layer) -> None:
    """The arguments both feed-forwards share: ``bias`` a bool, ``drop`` in [0, 1), ``norm_layer``
    a norm class (callable) or None."""
    check_bool("bias", bias)
    check_probability("drop", drop)
    if norm_layer is not None and not callable(norm_layer):
        raise ArgumentTypeError(f"norm_layer must be a norm class (such as nn.LayerNorm) or None, got {norm_layer!r}")


def glu_variant(name: str, order: int | None = None) -> tuple[str, bool, str]:
    """``(kernel kind, expanded, canonical name)`` of a GLU name, e.g. ``glu_variant("xswiglu",
    order=1)`` -> ``("sigmoid", True, "xswiglu1")``.

    ``order`` (1 or 2) picks the order of a family name without one (``swiglu``, ``geglu``,
    ``atglu`` and their ``x`` forms); with a name that carries its order it must agree.
    """
    if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
        raise ArgumentTypeError(f"order must be 1, 2 or None, got {order!r} ({type(order).__name__})")
    if order is not None and order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if name in _LEGACY:
        name = _LEGACY[name]
    if name in GLU_FAMILIES:
        default = GLU_FAMILIES[name]
        if order is None and default is None:
            warnings.warn(
                f"GLU name {name!r} does not say its order: it means {name}2 = a * expand(g(a), alpha) * b "
                f"(second order, as in gatezoo 0.1), while x-activation's class of that name defaults to first "
                f"order; write {name}1 or {name}2 (or pass order=)", FutureWarning, stacklevel=3)
        name = f"{name}{order or default or 2}"
    if name not in GLU_VARIANTS:
        raise ValueError(f"GLU name must be one of {sorted(GLU_VARIANTS)} or {sorted(GLU_FAMILIES)} with order=, "
                         f"got {name!r}")
    kind, expanded = GLU_VARIANTS[name]
    if order is not None and KINDS[kind].order != order:
        raise ValueError(f"order={order} contradicts the GLU name {name!r}, which is order {KINDS[kind].order}")
    return kind, expanded, name


def glu_hidden_features(dim: int) -> int:
    """2/3 of 4*dim (the parameter count of a 4x MLP), rounded up to a multiple of 8 so the
    matmuls map onto tensor-core tiles."""
    dim = check_int("dim", dim)
    hidden = (8 * dim + 2) // 3  # ceil(2/3 * 4 * dim)
    return (hidden + 7) // 8 * 8


class GatedAct(nn.Module):
    """phi(x) for one kind of :data:`gatezoo.kernels.KINDS` (``silu`` is SiLU, ``gelu`` GELU...).

    Args:
        kind: activation kind.
        expanded: hold a trainable ``alpha`` (init 0, so training starts from the plain
            activation), turning SiLU into xSiLU, GELU into xGELU, ATLU into xATLU.
        backend: ``"auto" | "torch" | "triton"``.
    """

    def __init__(self, kind: str = "silu", expanded: bool = False, backend: str = "auto"):
        super().__init__()
        check_str("kind", kind)
        check_bool("expanded", expanded)
        check_backend(backend)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if expanded and not KINDS[kind].takes_alpha:
            raise ValueError(f"expanded=True needs a gated kind; {kind!r} has no gate to expand")
        self.kind, self.expanded, self.backend = kind, expanded, backend
        self.alpha = nn.Parameter(torch.zeros(())) if expanded else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_act(x, self.kind, self.alpha, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, expanded={self.expanded}"


class GLUFeedForward(nn.Module):
    """x -> fc2(phi(x W) * (x V)): a GLU feed-forward with one fused input projection.

    ``fc1`` projects to ``2 * hidden`` features laid out as ``[a | b]``, and the gate is fused
    with the product by :func:`gatezoo.kernels.glu_packed` (no copy of either half).

    Inside timm, ``hidden_features`` is ``int(dim * mlp_ratio)``: pass ``mlp_ratio=8/3`` to keep
    the parameter count of a 4x MLP (with timm's default of 4 the GLU has 1.5x the weights).

    Args:
        in_features: model width.
        hidden_features: GLU width; default 2/3 * 4 * in_features rounded up to a multiple of 8.
        out_features: output width (default ``in_features``).
        act_layer: timm-style activation class (torch's or timm's, or a partial of one, or its
            name), read as the gate kind (``nn.GELU`` -> GEGLU, ``nn.SiLU`` -> SwiGLU ...) when
            ``kind`` is not given.
        norm_layer: optional norm class applied to the hidden features (as timm's Mlp).
        bias: biases on both projections (default False, as in Shazeer 2020).
        drop: dropout after the gate and after ``fc2``.
        kind: activation kind of :data:`~gatezoo.kernels.KINDS`, or a GLU name of
            :data:`GLU_VARIANTS` such as ``"xswiglu1"`` (first order, x-activation's default) or
            ``"xswiglu2"``; default ``"silu"`` (SwiGLU). A family name without an order
            (``"xswiglu"``, ``"geglu"``...) takes ``order``.
        expanded: one trainable ``alpha`` for the block (init 0), e.g. ``kind="silu"`` (SwiGLU) ->
            the second-order ``xswiglu2``; prefer a name that says its order.
        order: 1 (``expand(g(a), alpha) * b``) or 2 (``a * expand(g(a), alpha) * b``) for a
            family name; must agree with a name or kind that fixes it.
        backend: ``"auto" | "torch" | "triton"``.
        device, dtype: factory arguments for the parameters (timm passes them).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=None, norm_layer=None, bias: bool = False, drop: float = 0.0, *,
                 kind: str | None = None, expanded: bool = False, order: int | None = None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if kind is None:
            kind = "silu" if act_layer is None else _kind_from_act_layer(act_layer)
        if not isinstance(kind, str):
            raise ArgumentTypeError(f"kind must be a string, got {type(kind).__name__}")
        check_bool("expanded", expanded)
        check_optional_int("order", order)
        if kind in KINDS:
            if order is not None and order != KINDS[kind].order:
                raise ValueError(f"order={order!r} contradicts kind={kind!r}, whose order is {KINDS[kind].order}")
        elif kind in GLU_VARIANTS or kind in GLU_FAMILIES or kind in _LEGACY:
            kind, named_expanded, _ = glu_variant(kind, order)
            expanded = named_expanded or expanded
        else:
            raise ValueError(f"kind must be one of {sorted(KINDS)} or a GLU name of {sorted(GLU_VARIANTS)} "
                             f"(or {sorted(GLU_FAMILIES)} with order=), got {kind!r}")
        if expanded and not KINDS[kind].takes_alpha:
            raise ValueError(f"expanded=True needs a gated kind; {kind!r} has no gate to expand")
        in_features = check_int("in_features", in_features)
        hidden = check_optional_int("hidden_features", hidden_features)
        hidden = glu_hidden_features(in_features) if hidden is None else hidden
        out_features = check_optional_int("out_features", out_features)
        out_features = in_features if out_features is None else out_features
        _check_common(bias, drop, norm_layer)
        check_backend(backend)
        self.in_features = in_features
        self.kind, self.expanded, self.backend = kind, expanded, backend
        self.hidden_features = hidden
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, **dd)
        self.alpha = nn.Parameter(torch.zeros((), **dd)) if expanded else None
        self.drop1 = Dropout(drop)
        self.norm = norm_layer(hidden, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, **dd)
        self.drop2 = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        check_features("x", x, self.in_features, "in_features", like=self.fc1.weight)
        h = glu_packed(self.fc1(x), self.kind, self.alpha, backend=self.backend)
        return self.drop2(self.fc2(self.norm(self.drop1(h))))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, expanded={self.expanded}, hidden_features={self.hidden_features}"


MLP_ACTIVATIONS = {
    "gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU,
    "atlu": functools.partial(GatedAct, "atlu"),
    "xgelu": functools.partial(GatedAct, "gelu", expanded=True),
    "xsilu": functools.partial(GatedAct, "silu", expanded=True),
    "xatlu": functools.partial(GatedAct, "atlu", expanded=True),
}
"""Activation names :class:`Mlp` takes as ``act_layer``: torch's GELU, ReLU and SiLU, and
ATLU and the expanded xGELU, xSiLU and xATLU of Huang 2024 (:class:`GatedAct`)."""


class Mlp(nn.Module):
    """The plain two-layer baseline: fc2(drop(act(fc1(x)))), hidden default 4 * in_features.

    Same signature as timm's ``Mlp``; ``act_layer`` is a class such as ``nn.GELU`` or
    ``nn.ReLU``, or a name of :data:`MLP_ACTIVATIONS` (``"gelu"``, ``"xatlu"``...). The expanded
    ones (``xgelu``, ``xsilu``, ``xatlu``) hold one trainable ``alpha`` per block, at ``act.alpha``.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=nn.GELU, norm_layer=None, bias: bool = True, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if isinstance(act_layer, str):
            if act_layer not in MLP_ACTIVATIONS:
                raise ValueError(f"act_layer must be one of {sorted(MLP_ACTIVATIONS)} or an nn.Module class, "
                                 f"got {act_layer!r}")
            act_layer = MLP_ACTIVATIONS[act_layer]
        elif not callable(act_layer):
            raise ArgumentTypeError(f"act_layer must be a name of {sorted(MLP_ACTIVATIONS)} or an nn.Module class, "
                                    f"got {act_layer!r} ({type(act_layer).__name__})")
        in_features = check_int("in_features", in_features)
        hidden = check_optional_int("hidden_features", hidden_features)
        hidden = 4 * in_features if hidden is None else hidden
        out_features = check_optional_int("out_features", out_features)
        out_features = in_features if out_features is None else out_features
        _check_common(bias, drop, norm_layer)
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, hidden, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = Dropout(drop)
        self.norm = norm_layer(hidden, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, **dd)
        self.drop2 = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        check_features("x", x, self.in_features, "in_features", like=self.fc1.weight)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
