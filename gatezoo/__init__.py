"""gatezoo: gated attention, gated activation and gating blocks for transformers.

Layers (imports go one way): :mod:`gatezoo.kernels` (functional ops, Triton + PyTorch),
:mod:`gatezoo.blocks` (nn.Modules), :mod:`gatezoo.models`, :mod:`gatezoo.train`,
:mod:`gatezoo.eval`.

Importing gatezoo also makes its vision presets timm models (``timm.create_model("gatezoo_vit_tiny")``,
see :mod:`gatezoo.models.timm_registry`) without importing timm: they are registered at once if
timm is already imported, otherwise as soon as something imports it.
"""

import sys as _sys

from . import blocks, kernels
from .blocks import GatedAct, GLUFeedForward, Mlp
from .kernels import gated_act, glu, glu_packed

__version__ = "0.2.0.dev0"
__all__ = ["GLUFeedForward", "GatedAct", "Mlp", "blocks", "gated_act", "glu", "glu_packed", "kernels", "__version__"]


def _register_with_timm() -> None:
    """Register the vision presets with timm. This runs inside someone else's ``import timm``,
    so a failure warns instead of breaking that import."""
    try:
        from .models.timm_registry import register_timm_models

        register_timm_models()
    except Exception as err:  # noqa: BLE001
        import warnings

        warnings.warn(f"gatezoo models not registered with timm ({type(err).__name__}: {err})", RuntimeWarning,
                      stacklevel=2)


class _RegisterAfterTimm:
    """Wraps timm's loader: executes timm's package as its own loader would, then registers the
    gatezoo models. Every other attribute (resource readers, ``get_source``...) is the wrapped
    loader's."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_with_timm()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _TimmImportHook:
    """A ``sys.meta_path`` finder that answers for ``timm`` only: it takes the spec the other
    finders give and wraps its loader in :class:`_RegisterAfterTimm`, so the registration runs
    right after timm's own import, whichever of the two packages is imported first."""

    gatezoo_timm_hook = True  # marks the hook, so a reloaded gatezoo does not add a second one

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in _sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if getattr(finder, "gatezoo_timm_hook", False) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None  # not installed: the import fails as it would without gatezoo
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterTimm(spec.loader)
        return spec


if not any(getattr(finder, "gatezoo_timm_hook", False) for finder in _sys.meta_path):
    _sys.meta_path.insert(0, _TimmImportHook())
if "timm" in _sys.modules:
    _register_with_timm()
