"""A mixture-of-experts convolution routed per image: :class:`MoEConv2d`.

Zhang et al. 2023, "Robust Mixture-of-Expert Training for Convolutional Neural Networks"
(AdvMoE, ICCV): an MoE-CNN layer keeps ``E`` groups of ``C_out`` filters, and a router picks,
for each image, the group(s) that run::

    s      = mean over (H, W) of x                        (B, C_in): the router's input
    r      = router(s)                                    top-k experts e_1..e_k, weights w_1..w_k
    y[b]   = sum_j w_bj * conv2d(x[b], W[e_bj]) (+ bias[e_bj])

Only the selected groups are computed (the images of each expert are gathered and convolved
with its filters alone), so a top-1 layer of ``C_out`` output channels costs what a dense
``C_out`` convolution costs, whatever ``E``. Inside ``torch.compile`` or ``torch.export``, where
the load cannot be read on the host, every group runs and the unchosen ones are weighted 0.

With ``k = 1`` the renormalised weight is exactly 1 and would pass no gradient to the router;
``straight_through`` (the default at ``k = 1``) keeps the forward value and routes the gradient
to the selected expert's probability, ``w + p_e - stop_gradient(p_e)``, as the authors' code
does with its one-hot mask.

The router is any of :mod:`gatezoo.blocks.routing` (``router="topk"`` by default, ``k = 1``).
The layer shares :class:`~gatezoo.blocks.moe.MoEFeedForward`'s bookkeeping: ``aux_loss`` (the
Switch balance loss, coefficient ``balance_coef``), the load counters read by
:func:`~gatezoo.blocks.moe.moe_stats`, ``last_routing``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.kernels.routing import make_plan
from gatezoo.kernels.routing.naive import tracing

from .checks import check_bool, check_float_tensor, check_int
from .moe import _build_router, _MoEModule

__all__ = ["MoEConv2d", "moe_conv2d_reference"]


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return check_int(name, value[0], minimum), check_int(name, value[1], minimum)
    v = check_int(name, value, minimum)
    return v, v


class MoEConv2d(_MoEModule):
    """A convolution whose filters form ``num_experts`` groups of ``out_channels``, routed per image.

    Args:
        in_channels, out_channels: channels in, and of each expert (the output's channels).
        kernel_size, stride, padding, dilation: as ``nn.Conv2d`` (ints or pairs).
        num_experts: E (E = 1 is a plain convolution).
        k: experts per image (default 1, as in AdvMoE).
        bias: a bias per expert.
        router, router_args: a router name of :data:`~gatezoo.blocks.routing.ROUTERS` (default
            ``"topk"``) and its keyword arguments, or a ready router for ``in_channels`` features.
        straight_through: pass the gradient to the selected experts' probabilities while the
            forward uses the router's weights (default: True when ``k == 1``, where the weight
            is the constant 1; refused for ``k > 1``, where the weights carry the gradient).
        balance_coef, z_loss_coef: the auxiliary losses of the router (see
            :class:`~gatezoo.blocks.moe.MoEFeedForward`).
        backend: of the router's top-k.

    ``forward(x)`` takes (B, in_channels, H, W) and returns (B, out_channels, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, *, stride=1, padding=0, dilation=1,
                 num_experts: int = 4, k: int = 1, bias: bool = False, router="topk", router_args: dict | None = None,
                 straight_through: bool | None = None, balance_coef: float = 0.01, z_loss_coef: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        check_int("num_experts", num_experts)
        check_bool("bias", bias)
        r = _build_router(router, in_channels, num_experts, k, router_args, backend, dd)
        self._setup(r, balance_coef, z_loss_coef, device)
        if straight_through is None:
            straight_through = self.k == 1 and not r.dense
        check_bool("straight_through", straight_through)
        if straight_through and self.k != 1:
            raise ValueError(f"straight_through applies to k = 1 (a weight of exactly 1), got k={self.k}: with k > 1 "
                             f"the renormalised weights carry the router's gradient")
        self.straight_through = straight_through
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, kh, kw, **dd))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **dd)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert like an ``nn.Conv2d`` of ``out_channels`` filters (Kaiming-uniform, a = sqrt(5))."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[e], -bound, bound)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(H', W') of an (H, W) input."""
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    def _conv(self, x: torch.Tensor, e: int) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[e]
        return F.conv2d(x, self.weight[e], bias, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        if b == 0:
            return x.new_zeros(0, self.out_channels, ho, wo)
        r = self._route(x.mean(dim=(2, 3)), None if task_ids is None else task_ids)
        weights = r.weights
        if self.straight_through:
            chosen = r.probs.gather(1, r.indices)
            weights = weights + (chosen - chosen.detach())
        plan = make_plan(r.indices, self.num_experts, keep=r.keep)
        self._after_routing(r, plan)
        if tracing():  # torch.compile / export: no host read; every expert runs, unchosen ones weighted 0
            return self._dense(x, weights, r.indices, r.keep)
        flat = weights.reshape(-1).to(x.dtype)
        out = x.new_zeros(b, self.out_channels, ho, wo)
        bounds = plan.offsets.tolist()  # one host read: which experts have images
        for e in range(self.num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                continue
            rows, order = plan.token[lo:hi], plan.order[lo:hi]
            y = self._conv(x.index_select(0, rows), e)
            out = out.index_add(0, rows, y * flat.index_select(0, order).view(-1, 1, 1, 1))
        if not bounds[-1]:  # every choice masked out: still attached to the router's graph
            out = out + (weights.sum() * 0).to(out.dtype)
        return out

    def _dense(self, x, weights, indices, keep) -> torch.Tensor:
        """Every expert on every image, combined with the routing weights (0 for the unchosen):
        what a compiled or exported graph runs, since the sparse path reads the load on the host."""
        e, c = self.num_experts, self.out_channels
        w = weights if keep is None else weights * keep
        full = torch.zeros(x.shape[0], e, dtype=x.dtype, device=x.device).scatter_add(1, indices, w.to(x.dtype))
        bias = None if self.bias is None else self.bias.reshape(e * c)
        y = F.conv2d(x, self.weight.reshape(e * c, *self.weight.shape[2:]), bias, self.stride, self.padding,
                     self.dilation)
        return (y.view(x.shape[0], e, c, *y.shape[2:]) * full[:, :, None, None, None]).sum(1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, num_experts={self.num_experts}, k={self.k}, bias={self.bias is not None}, "
                f"straight_through={self.straight_through}")


def moe_conv2d_reference(layer: MoEConv2d, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``sum_j weights[b, j] * conv2d(x[b], W[indices[b, j]])`` image by image in ``dtype``: the
    plain definition :class:`MoEConv2d` is tested against (given the router's choices)."""
    out = []
    for bi in range(x.shape[0]):
        acc = 0
        for j in range(indices.shape[1]):
            e = int(indices[bi, j])
            bias = None if layer.bias is None else layer.bias[e].to(dtype)
            y = F.conv2d(x[bi:bi + 1].to(dtype), layer.weight[e].to(dtype), bias, layer.stride, layer.padding,
                         layer.dilation)
            acc = acc + weights[bi, j].to(dtype) * y
        out.append(acc)
    return torch.cat(out)
