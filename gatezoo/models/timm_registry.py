"""The gatezoo vision presets as timm models.

Every image preset of :func:`gatezoo.models.list_models` is registered with timm's model
registry under its name with the prefix ``gatezoo_``, so timm's tools build them by name::

    import gatezoo, timm
    model = timm.create_model("gatezoo_vit_tiny_rela", num_classes=100, in_chans=3, img_size=32)
    timm.list_models("gatezoo_*")

``import gatezoo`` registers them itself: at once when timm is already imported, otherwise right
after timm's own import finishes (a post-import hook in ``gatezoo/__init__.py``), so the two
packages may be imported in either order and gatezoo never imports timm on its own.
:func:`register_timm_models` does the work and may be called again: it registers what is missing
and leaves alone what is there.

The keyword arguments of ``timm.create_model`` are fields of the preset's config (``num_classes``,
``in_chans``, ``img_size``, ``dim``, ``depth``, ``attention``, ``ffn``...; see
:func:`gatezoo.models.create_model`); timm's ``drop_rate`` is the config's ``drop``. gatezoo ships
no pretrained weights: ``pretrained=True`` and weight tags (``"gatezoo_vit_tiny.some_tag"``) raise
ValueError; ``checkpoint_path=`` of ``timm.create_model`` loads a state dict as for any timm model.
See docs/timm.md.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from torch import nn

from .registry import create_model, list_models, model_config
from .vision import ImageConfig

PREFIX = "gatezoo_"

__all__ = ["PREFIX", "register_timm_models", "timm_model_names", "vision_presets"]


def vision_presets() -> list[str]:
    """The presets of :func:`gatezoo.models.list_models` that classify images (their config is
    an :class:`~gatezoo.models.ImageConfig`), sorted."""
    return [name for name in list_models() if isinstance(model_config(name), ImageConfig)]


def timm_model_names() -> list[str]:
    """The names :func:`register_timm_models` registers with timm: ``gatezoo_<preset>``."""
    return [PREFIX + name for name in vision_presets()]


def _pretrained_cfg(model: nn.Module, name: str, pretrained_cfg, overlay) -> dict:
    """timm's description of the model (``model.pretrained_cfg``, which timm's data helpers read):
    the input size, classes and layer names, with any ``pretrained_cfg`` dict and
    ``pretrained_cfg_overlay`` laid over it. No ``mean`` / ``std``: gatezoo's trainer normalises
    with each data set's own statistics, so there is no fixed pair to state."""
    cfg = model.config
    out = {"architecture": name, "tag": None, "num_classes": cfg.num_classes,
           "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size), "fixed_input_size": True,
           "first_conv": "patch_embed.proj", "classifier": "head"}
    if pretrained_cfg is not None:
        out.update(pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg))
    out.update(overlay or {})
    return out


def _entrypoint(preset: str) -> Callable[..., nn.Module]:
    """timm's entry point for ``preset``: a function named ``gatezoo_<preset>`` (timm registers a
    model under its function's ``__name__``) that builds the preset."""
    name = PREFIX + preset

    def build(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
              **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"pretrained=True: gatezoo has no pretrained weights for {name!r}; build it with "
                             f"pretrained=False (the default) and train it, or load your own weights with "
                             f"checkpoint_path=")
        if isinstance(pretrained_cfg, str):  # a weight tag, "gatezoo_vit_tiny.<tag>"
            raise ValueError(f"{name!r} has no pretrained weight tags (got {pretrained_cfg!r}); use the bare name")
        if "drop_rate" in kwargs:  # timm's name for the dropout its training script passes
            if "drop" in kwargs:
                raise ValueError("pass drop_rate (timm's name) or drop (gatezoo's), not both")
            kwargs["drop"] = kwargs.pop("drop_rate")
        if kwargs.get("drop_path_rate") in (0, 0.0):
            kwargs.pop("drop_path_rate")  # no stochastic depth here, and none asked for
        model = create_model(preset, **kwargs)
        model.pretrained_cfg = model.default_cfg = _pretrained_cfg(model, name, pretrained_cfg,
                                                                   pretrained_cfg_overlay)
        model.num_classes = model.config.num_classes
        return model

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = (f"The gatezoo preset {preset!r} (gatezoo.models.create_model({preset!r}, **kwargs)) for "
                     f"timm.create_model; no pretrained weights.")
    build.gatezoo_preset = preset
    return build


def register_timm_models() -> list[str]:
    """Register every vision preset with timm as ``gatezoo_<preset>`` and return the names
    registered by this call (empty when all were there already).

    Idempotent: a name gatezoo registered earlier is left as it is, and so, with a warning, is a
    name some other package registered. Imports timm. If timm is missing or its registry API is
    not the one this was written for (``timm.models.register_model``, ``is_model``,
    ``model_entrypoint``), it warns and registers what it can; it never raises for that.
    """
    try:
        from timm.models import is_model, model_entrypoint, register_model
    except (ImportError, AttributeError) as err:
        warnings.warn(f"gatezoo models not registered with timm: its registry API did not import ({err})",
                      RuntimeWarning, stacklevel=2)
        return []
    module = sys.modules[__name__]
    added = []
    for preset in vision_presets():
        name = PREFIX + preset
        try:
            if is_model(name):
                if getattr(model_entrypoint(name), "gatezoo_preset", None) != preset:
                    warnings.warn(f"timm already has a model named {name!r} that gatezoo did not register; "
                                  f"left as it is", RuntimeWarning, stacklevel=2)
                continue
            fn = _entrypoint(preset)
            setattr(module, name, fn)  # timm's register_model looks the function up in its module
            register_model(fn)
        except (AttributeError, KeyError, TypeError) as err:
            warnings.warn(f"gatezoo models not registered with timm: its registry API differs from the one "
                          f"gatezoo expects ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
            break
        added.append(name)
    return added
