"""GatedAct, GLUFeedForward and Mlp modules, including the timm drop-in."""

import functools

import pytest
import torch
from closeness import assert_close
from torch import nn

from gatezoo.blocks import GLU_VARIANTS, GatedAct, GLUFeedForward, Mlp, glu_hidden_features
from gatezoo.kernels import KINDS
from gatezoo.kernels.activation.naive import phi_composed


def test_hidden_default():
    assert glu_hidden_features(768) == 2048
    assert glu_hidden_features(128) == 344  # ceil(1024/3) = 342 -> 344
    assert all(glu_hidden_features(d) % 8 == 0 and glu_hidden_features(d) >= 8 * d / 3 for d in range(1, 300))
    assert GLUFeedForward(96).hidden_features == 256


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gated_act_module(kind):
    expanded = KINDS[kind].takes_alpha
    m = GatedAct(kind, expanded=expanded)
    x = torch.randn(4, 9, requires_grad=True)
    y = m(x)
    assert_close(kind, phi_composed(x, KINDS[kind]), y, 1e-6)  # alpha starts at 0
    y.square().sum().backward()
    if expanded:
        assert m.alpha.grad is not None and m.alpha.grad.abs() > 0


@pytest.mark.parametrize("name", sorted(GLU_VARIANTS))
def test_glu_feedforward_matches_manual(name):
    torch.manual_seed(1)
    ff = GLUFeedForward(24, kind=name)
    kind, expanded = GLU_VARIANTS[name]
    assert (ff.alpha is not None) == expanded
    if expanded:
        with torch.no_grad():
            ff.alpha.fill_(0.2)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y = ff(x)
    h = ff.fc1(x)
    a, b = h.chunk(2, dim=-1)
    ref = ff.fc2(phi_composed(a, KINDS[kind], ff.alpha) * b)
    assert y.shape == (2, 5, 24)
    assert_close(name, ref, y, 1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in ff.parameters())


def test_glu_feedforward_reads_act_layer_and_bias_default():
    assert GLUFeedForward(16, act_layer=nn.GELU).kind == "gelu"
    assert GLUFeedForward(16).kind == "silu"
    assert GLUFeedForward(16).fc1.bias is None
    with pytest.raises(ValueError, match="act_layer"):
        GLUFeedForward(16, act_layer=nn.Tanh)
    with pytest.raises(ValueError, match="kind must be one of"):
        GLUFeedForward(16, kind="swishglu")
    with pytest.raises(ValueError, match="expanded=True needs a gated kind"):
        GLUFeedForward(16, kind="relu", expanded=True)


def test_mlp_baseline():
    m = Mlp(12, act_layer="relu")
    assert m.fc1.out_features == 48
    y = m(torch.randn(3, 12))
    assert y.shape == (3, 12) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="act_layer"):
        Mlp(12, act_layer="swish")


@pytest.mark.parametrize("mlp_layer", [
    functools.partial(GLUFeedForward, expanded=True),
    functools.partial(GLUFeedForward, kind="xswiglu1"),
    Mlp,
], ids=["xgeglu-from-act_layer", "xswiglu1", "mlp"])
def test_timm_vision_transformer_mlp_layer(mlp_layer):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    model = timm_vit.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=8 / 3, mlp_layer=mlp_layer,
    )
    x = torch.randn(2, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_timm_activation_classes_and_names_pick_the_gate():
    timm_layers = pytest.importorskip("timm.layers")
    assert GLUFeedForward(16, act_layer=timm_layers.get_act_layer("gelu")).kind == "gelu"
    assert GLUFeedForward(16, act_layer=timm_layers.get_act_layer("silu")).kind == "silu"
    assert GLUFeedForward(16, act_layer=functools.partial(nn.GELU, approximate="none")).kind == "gelu"
    assert GLUFeedForward(16, act_layer="relu").kind == "relu"
    with pytest.raises(ValueError, match="has no GLU gate"):
        GLUFeedForward(16, act_layer=timm_layers.get_act_layer("gelu_tanh"))


def test_torch_compile_fullgraph_traces_the_composition():
    ff = GLUFeedForward(16, kind="xswiglu2")
    with torch.no_grad():
        ff.alpha.fill_(0.3)
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(ff, backend="eager", fullgraph=True)
    assert_close("compiled", ff(x), compiled(x), 1e-6)
