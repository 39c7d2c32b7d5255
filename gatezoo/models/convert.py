"""Weight conversion from timm.

:func:`vit_state_dict_from_timm` renames and splits the state dict of a timm
``VisionTransformer`` (class token, learned position embedding, pre-norm blocks with a fused
``qkv`` projection and a GELU MLP) so that a gatezoo :class:`~gatezoo.models.VisionTransformer`
with ``attention="softmax"`` and ``ffn="mlp-gelu"`` of the same shape loads it and computes the
same logits. timm itself is not imported: only the tensors are read.

>>> from gatezoo.models import create_model, vit_state_dict_from_timm
>>> model = create_model("vit_tiny")
>>> model.load_state_dict(vit_state_dict_from_timm(timm_vit.state_dict()))
"""

from __future__ import annotations

import re

import torch

_TOP = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
        "head.weight", "head.bias")
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn.proj", "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2"}


def vit_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gatezoo ViT state dict from a timm ``VisionTransformer`` state dict.

    Each block's fused ``attn.qkv`` (rows q, k, v) becomes ``attn.q`` and ``attn.kv``; ``mlp``
    becomes ``ffn``; every other name is kept. The tensors are shared, not copied. Raises
    ``ValueError`` naming the key when ``state_dict`` has a key this mapping does not know (a
    register token, a layer scale, a pre-norm, a q/k norm, ...) or lacks one it needs.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    missing = [k for k in _TOP if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict: not a timm VisionTransformer state dict, missing {missing}")
    out = {k: state_dict[k] for k in _TOP}
    pattern = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
    for key, value in state_dict.items():
        if key in _TOP:
            continue
        m = pattern.fullmatch(key)
        if m is None:
            raise ValueError(f"state_dict: key {key!r} has no counterpart in a gatezoo softmax / mlp-gelu ViT")
        block, layer, kind = m.groups()
        prefix = f"blocks.{block}."
        if layer == "attn.qkv":
            if value.shape[0] % 3:
                raise ValueError(f"state_dict: {key!r} must have 3*dim rows, got shape {tuple(value.shape)}")
            dim = value.shape[0] // 3
            out[prefix + f"attn.q.{kind}"], out[prefix + f"attn.kv.{kind}"] = value[:dim], value[dim:]
        else:
            out[prefix + f"{_BLOCK[layer]}.{kind}"] = value
    return out
