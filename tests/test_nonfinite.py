"""Non-finite inputs: the torch and Triton paths follow one rule (docs/architecture.md,
'Non-finite inputs'). NaN propagates to every output it feeds, as PyTorch's ops do (a NaN query
row gives a NaN output row, a NaN key element NaN in every row that sees that key, a NaN logit
NaN routing weights for its token); +-inf gives what the PyTorch op gives in float32 (GELU(+inf)
is NaN there, as ATen computes it)."""

import pytest
import torch

from gatezoo.kernels import KINDS, gated_rms_norm, glu, rela_attention, rms_norm, route, token_mixing

# the Triton interpreter (numpy) warns about the NaN it is asked to make
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SPECIALS = [float("nan"), float("inf"), -float("inf")]


def _same_special(a: torch.Tensor, b: torch.Tensor) -> None:
    """NaN where and only where the other is NaN, the same infinities, finite values close."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)) and torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-5)


def _both(fn):
    return fn("torch"), fn("triton")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_glu_special_values_agree(kind):
    vals = torch.tensor(SPECIALS + [0.0, 1.5, -2.0])
    a = vals.repeat_interleave(len(vals)).view(1, -1)
    b = vals.repeat(len(vals)).view(1, -1)
    y_torch, y_triton = _both(lambda be: glu(a, b, kind, backend=be))
    _same_special(y_torch, y_triton)
    # NaN anywhere in a pair gives NaN
    assert torch.isnan(y_torch[torch.isnan(a) | torch.isnan(b)]).all()


@pytest.mark.parametrize("special", SPECIALS)
def test_norms_special_values_agree(special):
    x = torch.randn(3, 9)
    x[1, 4] = special
    w, g = torch.randn(9), torch.randn(9)
    _same_special(*_both(lambda be: rms_norm(x, w, backend=be)))
    _same_special(*_both(lambda be: gated_rms_norm(x, w, g, backend=be)))
    if special != special:  # a NaN poisons its own row only
        assert torch.isnan(rms_norm(x, w, backend="triton")[1]).all()
        assert torch.isfinite(rms_norm(x, w, backend="triton")[[0, 2]]).all()


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", ["q_row", "k_elem", "v_elem"])
def test_rela_special_values_agree(special, where):
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    if where == "q_row":
        q[0, 0, 1] = special
    elif where == "k_elem":
        k[0, 1, 2, 3] = special
    else:
        v[0, 0, 3, 5] = special
    y_torch, y_triton = _both(lambda be: rela_attention(q, k, v, backend=be))
    _same_special(y_torch, y_triton)
    if special != special and where == "q_row":
        assert torch.isnan(y_triton[0, 0, 1]).all() and torch.isfinite(y_triton[0, 1]).all()


def test_rela_nan_reaches_the_value_gradient_on_both_paths():
    q, k, v = (torch.randn(1, 1, 4, 8, requires_grad=True) for _ in range(3))
    grads = []
    for be in ("torch", "triton"):
        qq = q.detach().clone()
        qq[0, 0, 2, 1] = float("nan")
        qq.requires_grad_()
        vv = v.detach().clone().requires_grad_()
        rela_attention(qq, k, vv, backend=be).sum().backward()
        grads.append(vv.grad)
    _same_special(*grads)
    assert torch.isnan(grads[1]).any()


@pytest.mark.parametrize("special", SPECIALS)
def test_route_special_values_agree(special):
    logits = torch.randn(6, 5)
    logits[2, 1] = special
    r_torch, r_triton = _both(lambda be: route(logits, 2, backend=be))
    _same_special(r_torch.weights, r_triton.weights)
    assert ((r_triton.indices >= 0) & (r_triton.indices < 5)).all()  # valid expert ids whatever the input
    if special != special:
        assert torch.isnan(r_triton.weights[2]).all() and torch.isfinite(r_triton.weights[[0, 1, 3, 4, 5]]).all()
        assert torch.equal(r_torch.indices[2], r_triton.indices[2])  # NaN ranks first, as in torch.sort


@pytest.mark.parametrize("special", SPECIALS)
def test_token_mixing_special_values_agree(special):
    x = torch.randn(2, 5, 6)
    x[1, 3, 2] = special
    w1, b1, w2, b2 = torch.randn(7, 5), torch.randn(7), torch.randn(5, 7), torch.randn(5)
    _same_special(*_both(lambda be: token_mixing(x, w1, b1, w2, b2, backend=be)))
