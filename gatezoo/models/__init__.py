"""Models built from :mod:`gatezoo.blocks`: Vision Transformer, MLP-Mixer and NiNformer image
classifiers, configured by dataclasses and created by name from a registry.

>>> from gatezoo.models import create_model, list_models
>>> model = create_model("vit_tiny_rela")          # 28x28x1 images, 10 classes
>>> logits = model(images)                         # (B, 10)
"""

from .convert import vit_state_dict_from_timm
from .registry import create_model, list_models, model_config
from .vision import (
    ATTENTIONS,
    FFNS,
    ImageConfig,
    MixerConfig,
    MLPMixer,
    NiNformer,
    NiNformerConfig,
    PatchEmbed,
    VisionTransformer,
    ViTBlock,
    ViTConfig,
)

__all__ = [
    "ATTENTIONS", "FFNS", "ImageConfig", "MLPMixer", "MixerConfig", "NiNformer", "NiNformerConfig", "PatchEmbed",
    "ViTBlock", "ViTConfig", "VisionTransformer", "create_model", "list_models", "model_config",
    "vit_state_dict_from_timm",
]
