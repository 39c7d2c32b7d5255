"""Hyper-gated layers of Self-Tuning Networks: :class:`HyperLinear`, :class:`HyperConv2d`,
:class:`RateDropout`, and :func:`hyper_gate`, which turns a model's layers into hyper-gated ones.

MacKay, Vicol, Lorraine, Duvenaud and Grosse 2019, "Self-Tuning Networks: Bilevel Optimization of
Hyperparameters using Structured Best-Response Functions" (ICLR). A self-tuning network makes its
weights a function of the hyperparameters, ``w(lambda)``, so that one network approximates the
best response ``argmin_w L_train(w, lambda)`` near the current ``lambda``. Each hyper-gated layer
computes, for hyperparameters ``h`` (the unconstrained ``lambda~``, one row per example or one
row for all)::

    y = s * (W x + b) + g_w(h) * (W_h x) + g_b(h) * b_h        (elementwise over output units)
    g_w(h), g_b(h) = split(U h)                     gate="linear" (the authors' code)
                   = sigmoid(split(U h + c))        gate="sigmoid"

``s`` is a learned scalar (1 at the start), ``U`` starts at N(0, 0.01^2) so the gate starts near
0. The sigmoid gate is the form of the exact best response of a linear network with an L2
penalty on its Jacobian: ridge regression, whose solution shrinks each principal direction by
``d_i / (d_i + lambda) = sigmoid(log d_i - log lambda)`` (tested numerically); the linear gate is
its first-order form, which the paper trains.

The hyperparameters reach the layers through :func:`set_hyperparameters`, like task ids reach
MoE layers, so a model's own ``forward`` needs no new argument: the self-tuning loop sets them
before each forward (``unconstrained`` for the gates, ``values`` for the layers that use a
hyperparameter directly, such as :class:`RateDropout`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import ArgumentTypeError, check_bool, check_float_tensor, check_int

__all__ = ["GATES", "HyperConv2d", "HyperLinear", "RateDropout", "hyper_gate", "hyper_layers",
           "set_hyperparameters"]

GATES = ("linear", "sigmoid")
"""Gate forms of the hyper-gated layers (``gate=``)."""


class _Hyper(nn.Module):
    """What :class:`HyperLinear` and :class:`HyperConv2d` share: the gate and the hyperparameter input."""

    def _setup_gate(self, num_hparams: int, units: int, gate: str, dd: dict) -> None:
        self.num_hparams = check_int("num_hparams", num_hparams)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.gate = gate
        self.gate_proj = nn.Linear(num_hparams, 2 * units, bias=gate == "sigmoid", **dd)
        self.elem_scale = nn.Parameter(torch.ones(1, **dd))
        self.hparams: torch.Tensor | None = None  # set by set_hyperparameters

    def _gates(self, hparams, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hparams is None:
            hparams = self.hparams
        if hparams is None:
            raise ValueError(f"{type(self).__name__} needs hyperparameters: pass hparams= or call "
                             f"gatezoo.blocks.set_hyperparameters(model, ...) first")
        check_float_tensor("hparams", hparams)
        if hparams.dim() == 1:
            hparams = hparams.unsqueeze(0)
        if hparams.dim() != 2 or hparams.shape[1] != self.num_hparams or hparams.shape[0] not in (1, batch):
            raise ValueError(f"hparams must have shape ({self.num_hparams},), (1, {self.num_hparams}) or "
                             f"({batch}, {self.num_hparams}), got {tuple(hparams.shape)}")
        g = self.gate_proj(hparams.to(like.dtype))
        if self.gate == "sigmoid":
            g = torch.sigmoid(g)
        return g.chunk(2, dim=-1)

    def reset_gate(self) -> None:
        nn.init.normal_(self.gate_proj.weight, std=0.01)
        if self.gate_proj.bias is not None:
            nn.init.zeros_(self.gate_proj.bias)


class HyperLinear(_Hyper):
    """A linear layer gated by hyperparameters (see the module docstring).

    ``forward(x, hparams=None)``: x (B, ..., in_features); hparams (num_hparams,), (1,
    num_hparams) or (B, num_hparams), default the ones :func:`set_hyperparameters` set.
    """

    def __init__(self, in_features: int, out_features: int, num_hparams: int, *, bias: bool = True,
                 gate: str = "linear", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        check_bool("bias", bias)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **dd))
        self.hnet_weight = nn.Parameter(torch.empty(out_features, in_features, **dd))
        self.bias = nn.Parameter(torch.empty(out_features, **dd)) if bias else None
        self.hnet_bias = nn.Parameter(torch.empty(out_features, **dd)) if bias else None
        self._setup_gate(num_hparams, out_features, gate, dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        for p in (self.weight, self.hnet_weight, self.bias, self.hnet_bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        self.reset_gate()

    def forward(self, x: torch.Tensor, hparams: torch.Tensor | None = None) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got {tuple(x.shape)}")
        b = x.shape[0] if x.dim() > 1 else 1
        gw, gb = self._gates(hparams, b, x)
        view = (gw.shape[0],) + (1,) * (x.dim() - 2) + (self.out_features,) if x.dim() > 1 else (self.out_features,)
        out = self.elem_scale * F.linear(x, self.weight, self.bias) + gw.reshape(view) * F.linear(x, self.hnet_weight)
        if self.hnet_bias is not None:
            out = out + gb.reshape(view) * self.hnet_bias
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, num_hparams={self.num_hparams}, "
                f"bias={self.bias is not None}, gate={self.gate!r}")


class HyperConv2d(_Hyper):
    """A 2-D convolution gated by hyperparameters, per output channel (see the module docstring).

    ``forward(x, hparams=None)``: x (B, in_channels, H, W); hparams as for :class:`HyperLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_hparams: int, *, stride=1, padding=0,
                 dilation=1, bias: bool = True, gate: str = "linear", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size)
        self.kernel_size = tuple(check_int("kernel_size", k) for k in ks)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        check_bool("bias", bias)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **dd))
        self.hnet_weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.hnet_bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self._setup_gate(num_hparams, out_channels, gate, dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        for p in (self.weight, self.hnet_weight, self.bias, self.hnet_bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        self.reset_gate()

    def _conv(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor, hparams: torch.Tensor | None = None) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        gw, gb = self._gates(hparams, x.shape[0], x)
        out = self.elem_scale * self._conv(x, self.weight, self.bias) + gw[:, :, None, None] * self._conv(
            x, self.hnet_weight)
        if self.hnet_bias is not None:
            out = out + (gb * self.hnet_bias)[:, :, None, None]
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, num_hparams={self.num_hparams}, gate={self.gate!r}")


class RateDropout(nn.Module):
    """Dropout whose rate is a tuned hyperparameter: column ``index`` of the ``values`` that
    :func:`set_hyperparameters` set, one rate per example (B,) or one for all. Elementwise
    dropout scaled by 1/(1 - p); identity in eval mode or without a rate set."""

    def __init__(self, index: int):
        super().__init__()
        self.index = check_int("index", index, 0)
        self.values: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.values is None:
            return x
        p = self.values[..., self.index].detach().to(x.dtype)
        if p.dim() == 0 or p.numel() == 1:
            p = p.reshape(()).expand(x.shape[0])
        if p.shape[0] != x.shape[0]:
            raise ValueError(f"the dropout rates have {p.shape[0]} rows, x has {x.shape[0]}")
        if bool(((p < 0) | (p >= 1)).any()):
            raise ValueError("dropout rates must lie in [0, 1)")
        keep = (1 - p).view(-1, *([1] * (x.dim() - 1)))
        mask = torch.rand_like(x) < keep
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"index={self.index}"


def hyper_layers(model: nn.Module) -> list[nn.Module]:
    """The hyper-gated layers and rate dropouts inside ``model``."""
    return [m for m in model.modules() if isinstance(m, (_Hyper, RateDropout))]


def set_hyperparameters(model: nn.Module, unconstrained: torch.Tensor | None,
                        values: torch.Tensor | None = None) -> None:
    """Give every hyper-gated layer of ``model`` its gate input ``unconstrained`` ((H,) or (B, H))
    and every :class:`RateDropout` the constrained ``values`` (same shape); None clears them."""
    for m in model.modules():
        if isinstance(m, _Hyper):
            m.hparams = unconstrained
        elif isinstance(m, RateDropout):
            m.values = values


def hyper_gate(model: nn.Module, num_hparams: int, *, gate: str = "linear",
               select: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Replace the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` (those ``select(name, module)``
    accepts; default: all) by :class:`HyperLinear` / :class:`HyperConv2d` with the same weights
    and biases (and the gate starting near 0), in place; returns ``model``. Raises ValueError
    when nothing was replaced."""
    if isinstance(num_hparams, bool) or not isinstance(num_hparams, int):
        raise ArgumentTypeError(f"num_hparams must be a positive int, got {num_hparams!r}")
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, _Hyper):  # its gate projection is not a layer to gate
            continue
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if select is not None and not select(full, child):
                continue
            new = None
            p = next(child.parameters(), None)
            dd = {"device": p.device, "dtype": p.dtype} if p is not None else {}
            if type(child) is nn.Linear:
                new = HyperLinear(child.in_features, child.out_features, num_hparams, bias=child.bias is not None,
                                  gate=gate, **dd)
            elif type(child) is nn.Conv2d and child.groups == 1 and isinstance(child.padding, tuple):
                new = HyperConv2d(child.in_channels, child.out_channels, child.kernel_size, num_hparams,
                                  stride=child.stride, padding=child.padding, dilation=child.dilation,
                                  bias=child.bias is not None, gate=gate, **dd)
            if new is None:
                continue
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(module, child_name, new)
            replaced += 1
    if not replaced:
        raise ValueError("hyper_gate found no nn.Linear or nn.Conv2d layer to gate")
    return model
