"""The vision presets as timm models (gatezoo/models/timm_registry.py and the import hook of
gatezoo/__init__.py): every preset by name, timm's keyword arguments, no pretrained weights,
either import order, idempotence, and a registry API that differs."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gatezoo
from gatezoo.models import MLPMixer, NiNformer, VisionTransformer, create_model, list_models, timm_registry

timm = pytest.importorskip("timm", reason="timm is an optional (dev) dependency")

ROOT = Path(__file__).resolve().parents[1]
IMAGE_MODELS = (VisionTransformer, MLPMixer, NiNformer)


def _vision_presets() -> list[str]:
    """Found by building each preset, independently of how the registry module picks them."""
    kwargs = lambda name: {"vocab_size": 50} if name.startswith("transformer_mt") else {}
    return [n for n in list_models() if isinstance(create_model(n, **kwargs(n)), IMAGE_MODELS)]


def test_every_vision_preset_is_registered():
    presets = _vision_presets()
    assert "vit_tiny_rela" in presets and len(presets) >= 5
    assert timm_registry.vision_presets() == presets
    assert sorted(timm.list_models("gatezoo_*")) == sorted("gatezoo_" + n for n in presets)
    assert not [n for n in timm.list_models("gatezoo_*") if "transformer_mt" in n]  # text models stay out


@pytest.mark.parametrize("preset", timm_registry.vision_presets())
def test_create_each_and_forward(preset):
    torch.manual_seed(0)
    model = timm.create_model("gatezoo_" + preset, pretrained=False, num_classes=5)
    torch.manual_seed(0)
    same = create_model(preset, num_classes=5)  # the same preset built by gatezoo, same seed
    assert type(model) is type(same) and model.num_classes == 5
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        y = model.eval()(x)
        assert y.shape == (2, 5) and torch.isfinite(y).all()
        assert torch.equal(y, same.eval()(x))
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.pretrained_cfg["num_classes"] == 5


def test_config_fields_and_timm_names_as_keywords():
    model = timm.create_model("gatezoo_vit_tiny", in_chans=3, img_size=16, num_classes=4, depth=1, drop_rate=0.1)
    assert model.config.drop == 0.1 and model.config.depth == 1
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 16, 16)
    assert timm.create_model("gatezoo_mixer_tiny", drop_path_rate=0.0).config.drop == 0.0
    overlay = timm.create_model("gatezoo_mixer_tiny", pretrained_cfg_overlay={"mean": (0.3,), "std": (0.2,)})
    assert timm.data.resolve_model_data_config(overlay)["mean"] == (0.3,)
    with pytest.raises(ValueError, match="no_such_field"):
        timm.create_model("gatezoo_vit_tiny", no_such_field=1)
    with pytest.raises(ValueError, match="drop_rate.*drop"):
        timm.create_model("gatezoo_vit_tiny", drop_rate=0.1, drop=0.2)


def test_pretrained_weights_are_refused():
    with pytest.raises(ValueError, match=r"pretrained=True.*no pretrained weights.*gatezoo_vit_tiny_rela"):
        timm.create_model("gatezoo_vit_tiny_rela", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weight tags.*in1k"):
        timm.create_model("gatezoo_vit_tiny.in1k")


def test_checkpoint_path_loads_a_state_dict(tmp_path):
    src = timm.create_model("gatezoo_ninformer_tiny")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = timm.create_model("gatezoo_ninformer_tiny", checkpoint_path=str(tmp_path / "w.pth"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_registration_is_idempotent():
    before = timm.models.model_entrypoint("gatezoo_vit_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert timm_registry.register_timm_models() == []
        gatezoo._register_with_timm()
    assert timm.models.model_entrypoint("gatezoo_vit_tiny") is before
    assert len([n for n in timm.list_models("gatezoo_*") if n == "gatezoo_vit_tiny"]) == 1


def test_a_name_taken_by_another_package_is_left_alone(monkeypatch):
    foreign = lambda **kw: None
    monkeypatch.setattr(timm.models, "is_model", lambda name: True)
    monkeypatch.setattr(timm.models, "model_entrypoint", lambda name: foreign)
    with pytest.warns(RuntimeWarning, match="that gatezoo did not register"):
        assert timm_registry.register_timm_models() == []


def test_a_different_registry_api_warns_and_skips(monkeypatch):
    monkeypatch.delattr(timm.models, "register_model")
    with pytest.warns(RuntimeWarning, match="registry API did not import"):
        assert timm_registry.register_timm_models() == []
    monkeypatch.undo()

    def broken(fn):
        raise TypeError("register_model() got an unexpected argument")

    monkeypatch.setattr(timm.models, "is_model", lambda name: False)
    monkeypatch.setattr(timm.models, "register_model", broken)
    with pytest.warns(RuntimeWarning, match="registry API differs.*TypeError"):
        assert timm_registry.register_timm_models() == []
    # a failure inside the hook warns instead of breaking the user's import of timm
    monkeypatch.setitem(sys.modules, "gatezoo.models.timm_registry", None)
    with pytest.warns(RuntimeWarning, match="not registered with timm"):
        gatezoo._register_with_timm()


def test_the_hook_answers_for_timm_only():
    hooks = [f for f in sys.meta_path if getattr(f, "gatezoo_timm_hook", False)]
    assert len(hooks) == 1  # installed once
    hook = hooks[0]
    assert hook.find_spec("numpy") is None and hook.find_spec("timm.models") is None
    spec = hook.find_spec("timm")
    assert type(spec.loader).__name__ == "_RegisterAfterTimm"
    assert spec.origin == timm.__spec__.origin and spec.loader.get_filename("timm") == timm.__file__
    assert hook.find_spec("no_such_package_gatezoo_test") is None


CHECK = """
import sys, warnings
warnings.simplefilter("error", RuntimeWarning)
{first}
{second}
print(gatezoo.__file__)
import torch
m = timm.create_model("gatezoo_vit_tiny_rela", num_classes=3)
print(tuple(m(torch.randn(1, 1, 28, 28)).shape))
"""


@pytest.mark.parametrize("order", ["gatezoo first", "timm first"])
def test_either_import_order_in_a_fresh_interpreter(order):
    """``import gatezoo; import timm`` (the hook registers after timm's import; gatezoo alone
    imports neither timm nor torchvision) and ``import timm.models; import gatezoo`` (registered at once)."""
    if order == "gatezoo first":
        first = "import gatezoo\nassert 'timm' not in sys.modules and 'torchvision' not in sys.modules"
        second = "import timm"
    else:
        first, second = "import timm.models\nimport timm", "import gatezoo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", CHECK.format(first=first, second=second)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    path, shape = run.stdout.splitlines()
    assert Path(path).resolve() == ROOT / "gatezoo" / "__init__.py"
    assert shape == "(1, 3)"
