"""gatezoo.kernels.dropout (the CPU mask from 32-bit integers) and the Dropout module."""

import math

import pytest
import torch
import torch.nn.functional as F

from gatezoo.blocks import Dropout
from gatezoo.kernels import dropout
from gatezoo.kernels.drop import CPU_MIN_ELEMENTS, keep_mask
from gatezoo.models import create_model

BIG = (301, 257)  # above CPU_MIN_ELEMENTS, odd sizes


def _within(frac: float, p: float, n: int, sds: float = 5.0) -> bool:
    return abs(frac - p) <= sds * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1e-3])
def test_drop_rate(p):
    torch.manual_seed(0)
    y = dropout(torch.ones(1000, 1000), p)
    frac = float((y == 0).double().mean())
    assert _within(frac, p, y.numel()), frac


def test_two_halves_of_each_draw_are_independent():
    # elements 2i and 2i+1 come from one 64-bit draw: both dropped should have probability p^2
    p, n = 0.3, 1 << 20
    torch.manual_seed(1)
    keep = keep_mask((n,), p).view(-1, 2)
    both = float((~keep[:, 0] & ~keep[:, 1]).double().mean())
    assert _within(both, p * p, n // 2), both
    assert _within(float((~keep).double().mean()), p, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contig", "transposed"])
def test_values_and_gradient(dtype, layout):
    torch.manual_seed(2)
    p = 0.25
    base = torch.rand(BIG) + 0.5 if layout == "contig" else (torch.rand(BIG[::-1]) + 0.5).t()
    x = base.to(dtype).requires_grad_()
    y = dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(y[kept], (x.detach() * (1 / (1 - p)))[kept])
    dy = torch.randn(BIG).to(dtype)
    y.backward(dy)
    # the gradient uses the forward's mask and scale
    assert torch.equal(x.grad, torch.where(kept, dy * (1 / (1 - p)), torch.zeros((), dtype=dtype)))


def test_second_order_graph():
    x = torch.rand(BIG, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.5)
    dy = torch.randn(BIG, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    (gdy,) = torch.autograd.grad(gx.sum(), dy)
    assert torch.equal(gdy, (y != 0).double() * 2.0)


def test_seeded_runs_repeat_and_calls_differ():
    x = torch.ones(BIG)
    torch.manual_seed(3)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_where_it_is_pytorchs_dropout():
    x = torch.randn(BIG)
    assert torch.equal(dropout(x, 0.5, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    small = torch.randn(CPU_MIN_ELEMENTS - 1)
    torch.manual_seed(4)
    ours = dropout(small, 0.3)
    torch.manual_seed(4)
    assert torch.equal(ours, F.dropout(small, 0.3))
    y = torch.randn(BIG)
    z = y.clone()
    out = dropout(z, 0.3, inplace=True)
    assert out is z and ((z == 0) | torch.isclose(z, y / 0.7)).all()


@pytest.mark.parametrize("p, err", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                    ("0.1", TypeError), (True, TypeError)])
def test_bad_probability(p, err):
    with pytest.raises(err, match="p must be"):
        dropout(torch.randn(4), p)


def test_bad_input():
    with pytest.raises(TypeError, match="x must be a tensor"):
        dropout([1.0, 2.0], 0.1)


def test_module_is_a_drop_in():
    m = Dropout(0.2)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.2 and repr(m) == "Dropout(p=0.2, inplace=False)"
    assert m.state_dict() == {}
    x = torch.ones(BIG)
    assert 0 < float((m(x) == 0).float().mean()) < 0.4
    assert torch.equal(m.eval()(x), x)


def test_models_use_it():
    for name, kwargs in [("transformer_mt_tiny", {"vocab_size": 64}), ("vit_tiny", {"drop": 0.1})]:
        model = create_model(name, **kwargs)
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(type(m) is Dropout for m in drops), name
