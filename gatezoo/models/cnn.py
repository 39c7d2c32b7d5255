"""A small residual CNN and its mixture-of-experts twin (the MoE-CNN of AdvMoE).

``cnn_small`` is a ResNet of BasicBlocks (two 3x3 convolutions, BatchNorm, ReLU, identity or
1x1 shortcut) in three stages of ``width``, ``2 width`` and ``4 width`` channels, the later two
at stride 2, then global average pooling and a linear head. ``cnn_small_moe`` is the same
backbone with every convolution inside the blocks a :class:`~gatezoo.blocks.MoEConv2d`: each
has ``num_experts`` filter groups of ``ratio x`` the dense channels and runs ``k`` of them per
image (Zhang et al. 2023, AdvMoE: ratio 0.5, top-1). The stem convolution, the shortcuts and the
head stay dense, at the MoE width. With ``ratio=1, num_experts=1`` the MoE model computes what
the dense one computes (same shapes up to the expert axis).

Inputs are normalised images (B, in_chans, H, W) of any size (the pooling is global).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gatezoo.blocks import ROUTERS
from gatezoo.blocks.checks import ArgumentTypeError, check_bool, check_int, check_non_negative, check_str
from gatezoo.blocks.moe_conv import MoEConv2d

__all__ = ["CNNConfig", "ResNetCNN"]


@dataclass
class CNNConfig:
    """Fields of :class:`ResNetCNN`.

    img_size, in_chans, num_classes: the data (``img_size`` is recorded, not needed: any size runs).
    width: channels of the first stage of the dense model (doubled at each later stage).
    depths: BasicBlocks per stage (three stages by default).
    moe: every block convolution a :class:`~gatezoo.blocks.MoEConv2d`.
    num_experts, k: the MoE layers' experts and experts per image.
    ratio: each expert's channels over the dense model's, in (0, 1]; the MoE model's every
        width is ``max(1, round(ratio * width))`` times the stage multiplier.
    router, router_args: the MoE layers' router (a name of :data:`gatezoo.blocks.ROUTERS`) and
        its keyword arguments.
    balance_coef: of the Switch balance loss of each MoE layer.
    backend: of the routers.
    """

    img_size: int | list = 28
    in_chans: int = 1
    num_classes: int = 10
    width: int = 32
    depths: tuple | list = (1, 1, 1)
    moe: bool = False
    num_experts: int = 4
    k: int = 1
    ratio: float = 0.5
    router: str = "topk"
    router_args: dict | None = None
    balance_coef: float = 0.01
    backend: str = "auto"

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first field out of range."""
        sizes = self.img_size if isinstance(self.img_size, (list, tuple)) else [self.img_size]
        for s in sizes:
            check_int("img_size", s)
        for name in ("in_chans", "num_classes", "width", "num_experts", "k"):
            check_int(name, getattr(self, name))
        if not isinstance(self.depths, (list, tuple)) or not self.depths:
            raise ArgumentTypeError(f"depths must be a non-empty list of block counts, got {self.depths!r}")
        for d in self.depths:
            check_int("depths", d)
        check_bool("moe", self.moe)
        check_str("router", self.router)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.router_args is not None and not isinstance(self.router_args, dict):
            raise ArgumentTypeError(f"router_args must be a dict or None, got {self.router_args!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
        check_non_negative("balance_coef", self.balance_coef)
        if self.k > self.num_experts:
            raise ValueError(f"k must be <= num_experts ({self.num_experts}), got {self.k}")
        if not self.moe:
            changed = [f for f, default in (("num_experts", 4), ("k", 1), ("ratio", 0.5), ("router", "topk"),
                                            ("router_args", None), ("balance_coef", 0.01))
                       if getattr(self, f) != default]
            if changed:
                raise ValueError(f"{', '.join(changed)} apply to the MoE model only (moe: true)")

    @property
    def base_width(self) -> int:
        """Channels of the first stage: ``width``, or ``round(ratio * width)`` for the MoE model."""
        return max(1, round(self.ratio * self.width)) if self.moe else self.width


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU; the convolutions dense or MoE."""

    def __init__(self, cin: int, cout: int, stride: int, cfg: CNNConfig):
        super().__init__()
        self.conv1 = _conv(cin, cout, stride, cfg)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv(cout, cout, 1, cfg)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _conv(cin: int, cout: int, stride: int, cfg: CNNConfig) -> nn.Module:
    if not cfg.moe:
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    return MoEConv2d(cin, cout, 3, stride=stride, padding=1, num_experts=cfg.num_experts, k=cfg.k,
                     router=cfg.router, router_args=dict(cfg.router_args or {}), balance_coef=cfg.balance_coef,
                     backend=cfg.backend)


class ResNetCNN(nn.Module):
    """The residual CNN of :class:`CNNConfig` (dense, or the MoE-CNN with ``moe=True``)."""

    def __init__(self, cfg: CNNConfig | None = None, **overrides):
        super().__init__()
        if cfg is not None and overrides:
            raise TypeError(f"pass either a config or field overrides, not both (got overrides {sorted(overrides)})")
        cfg = CNNConfig(**overrides) if cfg is None else cfg
        if not isinstance(cfg, CNNConfig):
            raise ArgumentTypeError(f"cfg must be a CNNConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config = cfg
        w = cfg.base_width
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_chans, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks, cin = [], w
        for i, depth in enumerate(cfg.depths):
            cout = w * 2 ** i
            for j in range(depth):
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1, cfg))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, MoEConv2d):
                for e in range(m.num_experts):
                    nn.init.kaiming_normal_(m.weight[e], mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ArgumentTypeError(f"images must be a floating-point tensor (B, C, H, W), got "
                                    f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.dim() != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(f"images must have shape (B, {self.config.in_chans}, H, W), got {tuple(images.shape)}")
        x = self.blocks(self.stem(images))
        return self.head(x.mean(dim=(2, 3)))
