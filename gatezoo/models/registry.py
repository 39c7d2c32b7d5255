"""Named model presets: ``create_model(name, **overrides)`` and ``list_models()``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from gatezoo.blocks.checks import ArgumentTypeError

from .cnn import CNNConfig, ResNetCNN
from .tabular import TabularConfig, TabularMLP, TabularMoE
from .translation import EncoderDecoder, TranslationConfig
from .vision import MixerConfig, MLPMixer, NiNformer, NiNformerConfig, VisionTransformer, ViTConfig

# name -> (model class, config class, preset fields); the image presets fit 28x28x1 images, 10 classes
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], type, dict]] = {
    "vit_tiny": (VisionTransformer, ViTConfig, {}),
    "vit_tiny_rela": (VisionTransformer, ViTConfig, {"attention": "rela"}),
    "vit_tiny_xswiglu": (VisionTransformer, ViTConfig, {"ffn": "xswiglu2"}),  # second order, as in 0.1
    "vit_tiny_xswiglu1": (VisionTransformer, ViTConfig, {"ffn": "xswiglu1"}),  # x-activation's default order
    # 8 SwiGLU experts, top-2: a token's active parameters match vit_tiny's feed-forward
    "vit_tiny_moe": (VisionTransformer, ViTConfig, {"ffn": "moe"}),
    "mixer_tiny": (MLPMixer, MixerConfig, {}),
    "ninformer_tiny": (NiNformer, NiNformerConfig, {}),
    # the authors' structure: no LayerNorm before the head, one LayerNorm per layer
    "ninformer_tiny_official": (NiNformer, NiNformerConfig, {"head_norm": False, "shared_norm": True}),
    # a residual CNN (3 stages of 32/64/128 channels) and its MoE-CNN twin (AdvMoE: every block
    # convolution 4 experts of half the channels, top-1 per image)
    "cnn_small": (ResNetCNN, CNNConfig, {}),
    "cnn_small_moe": (ResNetCNN, CNNConfig, {"moe": True}),
    # translation (pass vocab_size=): d=256, 3+3 layers, 4 heads, FFN 1024, tied embeddings
    "transformer_mt_tiny": (EncoderDecoder, TranslationConfig, {}),
    "transformer_mt_tiny_rela": (EncoderDecoder, TranslationConfig, {"attention": "rela"}),
    "transformer_mt_tiny_moe": (EncoderDecoder, TranslationConfig, {"ffn": "moe"}),  # 8 SwiGLU experts, top-2
    # tabular (pass num_features=, num_outputs=): an MLP and dense mixtures of 4 MLP experts under the
    # softmax, Gumbel-softmax (GG MoE) and GRKAN (KAMoE) gates; _ple: piecewise-linear feature embedding
    "tabular_mlp": (TabularMLP, TabularConfig, {}),
    "tabular_mlp_ple": (TabularMLP, TabularConfig, {"embedding": "ple"}),
    "tabular_moe": (TabularMoE, TabularConfig, {"gate": "softmax"}),
    "tabular_moe_ple": (TabularMoE, TabularConfig, {"gate": "softmax", "embedding": "ple"}),
    "tabular_ggmoe": (TabularMoE, TabularConfig, {"gate": "gumbel"}),
    "tabular_ggmoe_ple": (TabularMoE, TabularConfig, {"gate": "gumbel", "embedding": "ple"}),
    "tabular_grkan_moe": (TabularMoE, TabularConfig, {"gate": "grkan"}),
    "tabular_grkan_moe_ple": (TabularMoE, TabularConfig, {"gate": "grkan", "embedding": "ple"}),
}


def list_models() -> list[str]:
    """Names :func:`create_model` accepts, sorted."""
    return sorted(_REGISTRY)


def model_config(name: str, **overrides):
    """The config dataclass of preset ``name`` with ``overrides`` applied (validated: a field of
    the wrong type raises TypeError, one out of range ValueError, each naming the field)."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"name must be a model name (a str, see list_models()), got {name!r} "
                                f"({type(name).__name__})")
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    _, cfg_cls, preset = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; its config fields are {sorted(fields)}")
    cfg = cfg_cls(**{**preset, **overrides})
    cfg.validate()
    return cfg


def create_model(name: str, **overrides) -> nn.Module:
    """Build preset ``name`` (see :func:`list_models`); ``overrides`` replace fields of its config
    dataclass, e.g. ``num_classes``, ``in_chans``, ``img_size``, ``dim``, ``depth`` (image models) or
    ``vocab_size``, ``attention``, ``ffn`` (translation models).

    >>> model = create_model("ninformer_tiny", num_classes=100, in_chans=3, img_size=32)
    >>> mt = create_model("transformer_mt_tiny_rela", vocab_size=8000)
    """
    cfg = model_config(name, **overrides)
    model = _REGISTRY[name][0](cfg)
    model.model_name = name
    return model
