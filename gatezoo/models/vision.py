"""Image classifiers: Vision Transformer, MLP-Mixer and NiNformer, configured by dataclasses.

All three share the stem and the head: a convolutional patch embedding (kernel = stride =
patch), a stack of blocks, a final LayerNorm and a linear head over the class token (ViT) or
the mean of the tokens (Mixer, NiNformer). ``model(images)`` maps (B, in_chans, H, W) images to
(B, num_classes) logits.

The configs' ``validate`` checks every field (wrong type: TypeError, wrong value: ValueError,
each naming the field; a bool field must be an actual bool). ``model(images)`` takes normalised
floating-point images of the model's dtype (uint8 images are an error, not silently cast), and an
empty batch gives (0, num_classes) logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gatezoo.blocks import (
    GLU_FAMILIES,
    GLU_VARIANTS,
    MLP_ACTIVATIONS,
    MixerBlock,
    NiNBlock,
    ReLAAttention,
    SoftmaxAttention,
)
from gatezoo.blocks.checks import (
    ArgumentTypeError,
    check_bool,
    check_dtype,
    check_float_tensor,
    check_int,
    check_positive,
    check_probability,
    check_str,
)

from .feedforward import build_feedforward
from .moe import MoEOptions, init_experts, inside_moe, link_stack

ATTENTIONS = ("softmax", "rela")
"""Attention names :class:`ViTConfig` takes."""
FFNS = (*(f"mlp-{act}" for act in MLP_ACTIVATIONS), *GLU_VARIANTS, "moe")
"""Feed-forward names :class:`ViTConfig` takes: ``mlp-<activation>``, a two-layer MLP with an
activation of :data:`gatezoo.blocks.MLP_ACTIVATIONS` (``mlp-gelu`` is ViT's own, ``mlp-xatlu``
the expanded ATLU), any GLU of :data:`gatezoo.blocks.GLU_VARIANTS` (``swiglu``,
``xswiglu1``, ...), or ``moe``, a mixture of experts set up by the config's
:class:`~gatezoo.models.moe.MoEOptions` fields. The GLU family names without an order (``xswiglu``...) are accepted too,
with a warning (see :func:`gatezoo.blocks.glu_variant`)."""


def _positive_ints(cfg, *names):
    for name in names:
        check_int(name, getattr(cfg, name))


def _bools(cfg, *names):
    for name in names:
        check_bool(name, getattr(cfg, name))


def _config(cls, cfg, overrides):
    if cfg is not None and overrides:
        raise TypeError(f"pass either a config or field overrides, not both (got overrides {sorted(overrides)})")
    if cfg is not None and not isinstance(cfg, cls):
        raise ArgumentTypeError(f"cfg must be a {cls.__name__} (or pass its fields as keyword arguments), got "
                                f"{type(cfg).__name__}")
    return cls(**overrides) if cfg is None else cfg


@dataclass
class ImageConfig:
    """Fields every image model shares."""

    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 128
    depth: int = 4
    drop: float = 0.0

    @property
    def num_tokens(self) -> int:
        """Patches per image: (img_size / patch_size)^2."""
        return (self.img_size // self.patch_size) ** 2

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first field that is out of range."""
        _positive_ints(self, "img_size", "patch_size", "in_chans", "num_classes", "dim", "depth")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        check_probability("drop", self.drop)


@dataclass
class ViTConfig(ImageConfig, MoEOptions):
    """Vision Transformer: ``attention`` in :data:`ATTENTIONS`, ``ffn`` in :data:`FFNS`
    (``"mlp-gelu"``, ``"mlp-xatlu"``, a GLU name such as ``"swiglu"`` / ``"xswiglu1"``, or
    ``"moe"`` with the mixture-of-experts fields of :class:`~gatezoo.models.moe.MoEOptions`)."""

    heads: int = 4
    mlp_ratio: float = 4.0
    attention: str = "softmax"
    ffn: str = "mlp-gelu"
    qkv_bias: bool = True  # biases on the q/k/v and output projections
    norm_eps: float = 1e-6  # LayerNorm eps, as in the original ViT and timm

    def validate(self) -> None:
        super().validate()
        check_str("attention", self.attention)
        check_str("ffn", self.ffn)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.ffn not in FFNS and self.ffn not in GLU_FAMILIES:
            raise ValueError(f"ffn must be one of {FFNS} (or {tuple(GLU_FAMILIES)}, which warn), got {self.ffn!r}")
        if self.ffn == "moe":
            self.validate_moe()
        else:
            self.reject_unused_moe()
        check_int("heads", self.heads)
        if self.dim % self.heads:
            raise ValueError(f"heads must be a positive int dividing dim ({self.dim}), got {self.heads!r}")
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ArgumentTypeError(f"mlp_ratio must be a positive number (hidden width dim * mlp_ratio >= 1), "
                                    f"got {ratio!r} ({type(ratio).__name__})")
        if not math.isfinite(ratio) or int(self.dim * ratio) < 1:
            raise ValueError(f"mlp_ratio must be a positive number (hidden width dim * mlp_ratio >= 1), "
                             f"got {self.mlp_ratio!r}")
        check_bool("qkv_bias", self.qkv_bias)
        check_positive("norm_eps", self.norm_eps)


@dataclass
class MixerConfig(ImageConfig):
    """MLP-Mixer: hidden units of the token and channel MLPs."""

    tokens_hidden: int = 64
    channels_hidden: int = 512

    def validate(self) -> None:
        super().validate()
        _positive_ints(self, "tokens_hidden", "channels_hidden")


@dataclass
class NiNformerConfig(ImageConfig):
    """NiNformer: hidden units of the gate sub-network's token and channel MLPs and of the
    feed-forward."""

    tokens_hidden: int = 64
    channels_hidden: int = 256
    ffn_hidden: int = 512
    head_norm: bool = True  # LayerNorm between the mean pool and the head (the authors' code has none)
    shared_norm: bool = False  # one LayerNorm per layer for both sub-blocks, as in the authors' code

    def validate(self) -> None:
        super().validate()
        _positive_ints(self, "tokens_hidden", "channels_hidden", "ffn_hidden")
        _bools(self, "head_norm", "shared_norm")


class PatchEmbed(nn.Module):
    """Non-overlapping patches as tokens: a convolution with kernel = stride = patch size,
    (B, C, H, W) -> (B, (H/p)(W/p), dim).

    The images must be floating point (normalised, as :class:`gatezoo.train.data.images.Batches` gives
    them) of the convolution's dtype, (B, in_chans, img_size, img_size)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        for name, v in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans), ("dim", dim)):
            check_int(name, v)
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.img_size, self.in_chans = img_size, in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("images", x, hint=" (normalised images: convert uint8 pixels with x.float() / 255 and "
                                             "normalise, as gatezoo.train.data.images.Batches does)")
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(f"images must have shape (batch, {self.in_chans}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}")
        check_dtype("images", x, self.proj.weight)
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder layer: ``x + attn(LN x)``, then ``x + ffn(LN x)``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if not isinstance(cfg, ViTConfig):
            raise ArgumentTypeError(f"cfg must be a ViTConfig, got {type(cfg).__name__}")
        cfg.validate()
        attn = SoftmaxAttention if cfg.attention == "softmax" else ReLAAttention
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = attn(cfg.dim, cfg.heads, dropout=cfg.drop, bias=cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = build_feedforward(cfg.ffn, cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.drop, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class _ImageModel(nn.Module):
    def __init__(self, cfg: ImageConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def _init_weights(self):
        skip = inside_moe(self)  # routers keep their own initialisation
        init_experts(self, lambda w: nn.init.trunc_normal_(w, std=0.02))  # experts like the dense layers
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in skip:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Token features after the last block and the final norm, (B, tokens, dim)."""
        x = self.patch_embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(images)))


class VisionTransformer(_ImageModel):
    """ViT (Dosovitskiy et al. 2021) with a class token, learned position embeddings and
    attention / feed-forward chosen by name (:class:`ViTConfig`)."""

    def __init__(self, cfg: ViTConfig | None = None, **overrides):
        cfg = _config(ViTConfig, cfg, overrides)
        super().__init__(cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, cfg.dim))
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        link_stack(cfg, [b.ffn for b in self.blocks])
        self._init_weights()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class MLPMixer(_ImageModel):
    """MLP-Mixer (Tolstikhin et al. 2021): token- and channel-mixing MLPs, mean-pooled."""

    def __init__(self, cfg: MixerConfig | None = None, **overrides):
        cfg = _config(MixerConfig, cfg, overrides)
        super().__init__(cfg)
        self.blocks = nn.ModuleList(
            MixerBlock(cfg.num_tokens, cfg.dim, cfg.tokens_hidden, cfg.channels_hidden, drop=cfg.drop)
            for _ in range(cfg.depth))
        self._init_weights()


class NiNformer(_ImageModel):
    """NiNformer (Abdullah & Aydin 2024): ViT-style layers whose attention is replaced by a
    gating unit with a gate generated by an MLP-Mixer sub-network (:class:`NiNBlock`).

    By default the head reads ``LN(mean over tokens)`` and each layer has its own LayerNorm
    before each sub-block. ``head_norm=False, shared_norm=True`` gives the structure of the
    authors' code instead: the head reads the mean directly and one LayerNorm per layer serves
    both sub-blocks (preset ``ninformer_tiny_official``)."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Token features after the last block, (B, tokens, dim); the final norm follows the
        pooling."""
        x = self.patch_embed(images)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.forward_features(images).mean(1)))

    def __init__(self, cfg: NiNformerConfig | None = None, **overrides):
        cfg = _config(NiNformerConfig, cfg, overrides)
        super().__init__(cfg)
        if not cfg.head_norm:
            self.norm = nn.Identity()
        self.blocks = nn.ModuleList(
            NiNBlock(cfg.num_tokens, cfg.dim, cfg.tokens_hidden, cfg.channels_hidden, cfg.ffn_hidden, drop=cfg.drop,
                     shared_norm=cfg.shared_norm)
            for _ in range(cfg.depth))
        self._init_weights()
