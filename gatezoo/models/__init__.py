"""Models built from :mod:`gatezoo.blocks`: Vision Transformer, MLP-Mixer and NiNformer image
classifiers, a residual CNN and its mixture-of-experts twin (the MoE-CNN of AdvMoE), and an
encoder-decoder translation Transformer, configured by dataclasses and created
by name from one registry.

>>> from gatezoo.models import create_model, list_models
>>> model = create_model("vit_tiny_rela")          # 28x28x1 images, 10 classes
>>> logits = model(images)                         # (B, 10)
>>> mt = create_model("transformer_mt_tiny", vocab_size=8000)
>>> logits = mt(src_ids, tgt_in_ids)               # (B, T_tgt, 8000)
"""

from .cnn import CNNConfig, ResNetCNN
from .convert import vit_state_dict_from_timm
from .export import ctranslate2_available, export_ctranslate2
from .extract import extract_task_model
from .moe import MoEOptions, moe_feedforward
from .registry import create_model, list_models, model_config
from .translation import (
    BOS_ID,
    EOS_ID,
    MT_ATTENTION_PLACES,
    MT_ATTENTIONS,
    MT_FFNS,
    NORM_POSITIONS,
    PAD_ID,
    DecoderCache,
    EncoderDecoder,
    Memory,
    TranslationConfig,
    sinusoidal_positions,
)
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
    "BOS_ID", "EOS_ID", "MT_ATTENTION_PLACES", "MT_ATTENTIONS", "MT_FFNS", "NORM_POSITIONS", "PAD_ID",
    "DecoderCache", "EncoderDecoder", "Memory",
    "MoEOptions", "moe_feedforward", "extract_task_model",
    "TranslationConfig", "ctranslate2_available", "export_ctranslate2", "sinusoidal_positions",
    "CNNConfig", "ResNetCNN",
    "ATTENTIONS", "FFNS", "ImageConfig", "MLPMixer", "MixerConfig", "NiNformer", "NiNformerConfig", "PatchEmbed",
    "ViTBlock", "ViTConfig", "VisionTransformer", "create_model", "list_models", "model_config",
    "vit_state_dict_from_timm",
]
