"""timm peers of the gatezoo vision models, for side-by-side comparisons.

``timm_vit_tiny``
    ``timm.models.vision_transformer.VisionTransformer(img_size=28, patch_size=4, in_chans=1,
    num_classes=10, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)`` with timm's defaults
    otherwise (class token, learned position embedding, pre-norm blocks, token pooling).
``timm_mixer_tiny``
    ``timm.models.mlp_mixer.MlpMixer(img_size=28, patch_size=4, in_chans=1, num_classes=10,
    embed_dim=128, num_blocks=4)`` (timm's default ``mlp_ratio=(0.5, 4.0)``, average pooling).

timm is an optional (dev) dependency, imported only when a peer is built. Overrides are keyword
arguments of the timm constructor; the gatezoo names ``dim`` (``embed_dim``), ``depth``
(``num_blocks`` for the mixer) and ``heads`` (``num_heads``) are accepted too, so one override
dict can size a gatezoo model and its peer alike.
"""

from __future__ import annotations

import inspect

from torch import nn

_DEFAULTS = {
    "timm_vit_tiny": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=4, num_heads=4,
                          mlp_ratio=4.0),
    "timm_mixer_tiny": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, num_blocks=4),
}
_ALIASES = {
    "timm_vit_tiny": {"dim": "embed_dim", "heads": "num_heads"},
    "timm_mixer_tiny": {"dim": "embed_dim", "depth": "num_blocks"},
}


def list_peers() -> list[str]:
    """Names of the timm peers :func:`create_peer` builds."""
    return sorted(_DEFAULTS)


def _timm_class(name: str):
    try:
        if name == "timm_vit_tiny":
            from timm.models.vision_transformer import VisionTransformer as cls
        else:
            from timm.models.mlp_mixer import MlpMixer as cls
    except ImportError as e:
        raise ImportError(
            f"the peer {name!r} needs timm, an optional dependency: pip install timm "
            f"(or pip install -e '.[dev]'); original error: {e}"
        ) from e
    return cls


def create_peer(name: str, **overrides) -> nn.Module:
    """Build the timm peer ``name`` (see :func:`list_peers`) with constructor ``overrides``.

    Raises ``ValueError`` for an unknown name or an override the timm constructor does not take.
    """
    if name not in _DEFAULTS:
        raise ValueError(f"name must be one of the timm peers {list_peers()}, got {name!r}")
    cls = _timm_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = dict(_DEFAULTS[name])
    for key, value in overrides.items():
        target = _ALIASES[name].get(key, key)
        if target not in accepted:
            raise ValueError(
                f"{name}: unknown override {key!r}; accepted: {sorted(set(_ALIASES[name]) | accepted)}"
            )
        kwargs[target] = value
    return cls(**kwargs)
