"""GLU and activation names: each says its order, maps to the formula of docs/activation.md and
to the authors' classes (x-activation), and ambiguous names warn."""

import math
import warnings

import pytest
import torch
from closeness import assert_close

from gatezoo.blocks import GLU_FAMILIES, GLU_VARIANTS, MLP_ACTIVATIONS, GLUFeedForward, Mlp, glu_variant
from gatezoo.models import FFNS, create_model


def expand(g, alpha):
    return (1 + 2 * alpha) * g - alpha


GATES = {
    "swiglu": torch.sigmoid,
    "geglu": lambda a: 0.5 * (1 + torch.erf(a / math.sqrt(2))),
    "atglu": lambda a: torch.atan(a) / math.pi + 0.5,
}


def formula(name, a, b, alpha):
    """The function a GLU name stands for, written from its name alone (family, order, x prefix)."""
    if name == "bilinear":
        return a * b
    if name == "reglu":
        return torch.relu(a) * b
    short = {"glu": "swiglu1", "xglu": "xswiglu1", "swiglu": "swiglu2", "geglu": "geglu2", "atglu": "atglu2"}
    name = short.get(name, name)
    expanded, family, order = name.startswith("x"), name.lstrip("x")[:-1], int(name[-1])
    g = GATES[family](a)
    if expanded:
        g = expand(g, alpha)
    return (a * g if order == 2 else g) * b


@pytest.mark.parametrize("name", sorted(GLU_VARIANTS))
def test_every_glu_name_computes_its_formula(name):
    torch.manual_seed(0)
    ff = GLUFeedForward(12, hidden_features=10, kind=name).double()
    if ff.alpha is not None:
        with torch.no_grad():
            ff.alpha.fill_(0.3)
    x = torch.randn(3, 12, dtype=torch.float64)
    a, b = ff.fc1(x).chunk(2, dim=-1)
    ref = ff.fc2(formula(name, a, b, 0.3))
    assert (ff.alpha is not None) == name.startswith("x")
    assert_close(name, ref, ff(x), 1e-12)


def test_official_defaults_and_orders():
    # x-activation: XSwiGLU / XGEGLU / XATGLU default to order 1, ATGLU to order 2
    assert glu_variant("xswiglu", order=1) == ("sigmoid", True, "xswiglu1")
    assert glu_variant("xgeglu", order=2) == ("gelu", True, "xgeglu2")
    assert glu_variant("atglu") == ("atlu", False, "atglu2")
    assert glu_variant("atglu", order=1) == ("arctan", False, "atglu1")
    assert glu_variant("xglu")[:2] == glu_variant("xswiglu1")[:2]  # the same function, two names
    assert glu_variant("xnormglu") == ("normcdf", True, "xgeglu1")  # gatezoo 0.1's name
    ff = GLUFeedForward(8, kind="xatglu", order=1)
    assert (ff.kind, ff.expanded) == ("arctan", True)


@pytest.mark.parametrize("name", [n for n, default in GLU_FAMILIES.items() if default is None])
def test_names_without_an_order_warn_and_keep_their_old_meaning(name):
    with pytest.warns(FutureWarning, match=f"{name}2 = a \\* expand"):
        ff = GLUFeedForward(8, kind=name)
    assert (ff.kind, ff.expanded) == GLU_VARIANTS[f"{name}2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GLUFeedForward(8, kind=name, order=2)  # said explicitly: no warning


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "xswiglu1", "order": 2}, "order=2 contradicts the GLU name 'xswiglu1'"),
    ({"kind": "silu", "order": 1}, "contradicts kind='silu'"),
    ({"kind": "glu", "order": 2}, "contradicts the GLU name 'glu', which is order 1"),
    ({"kind": "swiglu2", "order": 1}, "contradicts the GLU name 'swiglu2'"),
    ({"kind": "xswiglu", "order": 3}, "order must be 1 or 2"),
    ({"kind": "swishglu"}, "kind must be one of"),
    ({"kind": 3}, "kind must be a string"),
])
def test_glu_name_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GLUFeedForward(8, **kwargs)


@pytest.mark.parametrize("act", sorted(MLP_ACTIVATIONS))
def test_mlp_activations_by_name(act):
    torch.manual_seed(1)
    m = Mlp(6, 10, act_layer=act).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    alpha = getattr(m.act, "alpha", None)
    assert (alpha is not None) == act.startswith("x")
    if alpha is not None:
        with torch.no_grad():
            alpha.fill_(-0.2)
    h = m.fc1(x)
    gate = {"gelu": GATES["geglu"], "silu": torch.sigmoid, "atlu": GATES["atglu"], "relu": lambda t: (t > 0).double()}
    g = gate[act.lstrip("x")](h)
    if alpha is not None:
        g = expand(g, -0.2)
    assert_close(act, m.fc2(h * g), m(x), 1e-12)


def test_vit_ffn_names_and_presets():
    assert {"mlp-gelu", "mlp-xatlu", "glu", "xglu", "xswiglu1", "xswiglu2", "atglu1"} <= set(FFNS)
    assert create_model("vit_tiny_xswiglu").config.ffn == "xswiglu2"
    assert create_model("vit_tiny_xswiglu1").config.ffn == "xswiglu1"
    ffn = create_model("vit_tiny", ffn="mlp-xatlu", depth=1).blocks[0].ffn
    assert ffn.act.kind == "atlu" and ffn.act.alpha is not None
    with pytest.warns(FutureWarning):
        create_model("vit_tiny", ffn="xswiglu", depth=1)
