"""KANLayer (B-spline and RBF bases) and GRKAN (docs/architecture.md, 'The math')."""

import pytest
import torch
from closeness import assert_close
from torch import nn

from gatezoo.blocks import GRKAN, KANLayer
from gatezoo.blocks.kan import bspline_basis


def cox_de_boor(m: int, q: int, x: float, t: list[float]) -> float:
    """The textbook scalar recursion, with 0/0 read as 0."""
    if q == 0:
        return 1.0 if t[m] <= x < t[m + 1] else 0.0
    left = (x - t[m]) / (t[m + q] - t[m]) * cox_de_boor(m, q - 1, x, t) if t[m + q] != t[m] else 0.0
    right = ((t[m + q + 1] - x) / (t[m + q + 1] - t[m + 1]) * cox_de_boor(m + 1, q - 1, x, t)
             if t[m + q + 1] != t[m + 1] else 0.0)
    return left + right


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_bspline_partition_of_unity_inside_the_grid(order):
    layer = KANLayer(3, 2, grid_size=4, spline_order=order, grid_range=(-1.5, 2.5), dtype=torch.float64)
    x = torch.rand(50, 3, dtype=torch.float64) * 4 - 1.5  # inside [lo, hi)
    basis = layer.basis_values(x)
    assert basis.shape == (50, 3, 4 + order)
    assert (basis >= 0).all()
    assert_close("sum of the basis", torch.ones(50, 3, dtype=torch.float64), basis.sum(-1), 1e-12)
    far = layer.basis_values(torch.tensor([[-9.0, 9.0, 100.0]], dtype=torch.float64))
    assert (far == 0).all()  # outside the extended grid only the base branch is left


@pytest.mark.parametrize("order", [1, 3])
def test_bspline_basis_matches_scalar_cox_de_boor(order):
    grid_size, lo, hi = 5, -2.0, 2.0
    h = (hi - lo) / grid_size
    knots = [lo + (m - order) * h for m in range(grid_size + 2 * order + 1)]
    x = torch.linspace(lo - order * h + 1e-3, hi + order * h - 1e-3, 37, dtype=torch.float64)
    got = bspline_basis(x, torch.tensor(knots, dtype=torch.float64), order)
    want = torch.tensor([[cox_de_boor(m, order, float(v), knots) for m in range(grid_size + order)] for v in x],
                        dtype=torch.float64)
    assert_close("basis", want, got, 1e-12)
    layer = KANLayer(1, 1, grid_size=grid_size, spline_order=order, grid_range=(lo, hi), dtype=torch.float64)
    assert_close("layer knots", torch.tensor(knots, dtype=torch.float64), layer.grid, 1e-15)


def test_rbf_basis_is_gaussian_bumps_on_the_grid_points():
    layer = KANLayer(2, 3, basis="rbf", grid_size=4, grid_range=(-2, 2), dtype=torch.float64)
    assert layer.num_basis == 5
    centres = torch.linspace(-2, 2, 5, dtype=torch.float64)
    x = torch.tensor([[-2.0, 0.3]], dtype=torch.float64)
    basis = layer.basis_values(x)
    assert_close("rbf", torch.exp(-((x[..., None] - centres) / 1.0) ** 2), basis, 1e-14)
    assert basis[0, 0, 0] == 1.0


@pytest.mark.parametrize("basis", ["bspline", "rbf"])
def test_forward_is_base_plus_spline_sum(basis):
    layer = KANLayer(4, 3, basis=basis, grid_size=3, spline_order=2, bias=True, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    b = layer.basis_values(x)  # (2, 5, 4, nb)
    want = (torch.einsum("...ij,oij->...o", b, layer.spline_weight) + nn.functional.silu(x) @ layer.base_weight.T
            + layer.bias)
    y = layer(x)
    assert y.shape == (2, 5, 3)
    assert_close("kan", want, y, 1e-12)
    assert KANLayer(4, 3, base_activation=None).base_weight is None


@pytest.mark.parametrize("basis", ["bspline", "rbf"])
def test_gradcheck_float64(basis):
    layer = KANLayer(3, 2, basis=basis, grid_size=3, spline_order=3, grid_range=(-1, 1), dtype=torch.float64)
    x = (torch.rand(4, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_grkan_compact_formula_and_gradcheck():
    g = GRKAN(3, hidden=4, out_features=2, structure="compact", grid_size=3, dtype=torch.float64)
    assert g.kan2.out_features == 4 and g.skip.bias is None  # KAN2 outputs 2x for the GLU halves
    with torch.no_grad():
        g.norm.weight.normal_()
        g.norm.bias.normal_()
    x = torch.randn(5, 3, dtype=torch.float64)
    a, b = g.kan2(g.kan1(x)).chunk(2, -1)
    want = nn.functional.layer_norm(x @ g.skip.weight.T + a * torch.sigmoid(b), (2,), g.norm.weight, g.norm.bias)
    assert_close("grkan", want, g(x), 1e-12)
    assert g(torch.randn(2, 7, 3, dtype=torch.float64)).shape == (2, 7, 2)
    assert GRKAN(6).out_features == 6 and GRKAN(6).hidden == 6 and GRKAN(6).structure == "paper"

    names = [n for n, _ in g.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in g.parameters())
    xg = x[:3].clone().requires_grad_()

    def f(x, *ps):
        return torch.func.functional_call(g, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (xg, *params))


def test_grkan_paper_formula_from_its_layers():
    """The default structure, composed from its own layers (tests/test_grkan_fidelity.py
    re-derives it from the formula alone)."""
    g = GRKAN(3, hidden=4, out_features=2, dense_width=5, grid_size=3, dtype=torch.float64)
    assert (g.kan1.in_features, g.kan1.out_features, g.kan2.out_features) == (5, 4, 4)
    with torch.no_grad():
        for p in g.parameters():
            p.normal_()
    x = torch.randn(5, 3, dtype=torch.float64)
    h = torch.relu(g.dense(x))
    eta = g.kan2(g.kan1(h))
    glu = torch.sigmoid(eta @ g.glu_gate.weight.T + g.glu_gate.bias) * (eta @ g.glu_value.weight.T + g.glu_value.bias)
    want = nn.functional.layer_norm(h @ g.skip.weight.T + g.skip.bias + glu, (2,), g.norm.weight, g.norm.bias)
    assert_close("grkan", want, g(x), 1e-12)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="basis"):
        KANLayer(2, 2, basis="chebyshev")
    with pytest.raises(ValueError, match="grid_size"):
        KANLayer(2, 2, grid_size=0)
    with pytest.raises(ValueError, match="spline_order"):
        KANLayer(2, 2, spline_order=-1)
    with pytest.raises(ValueError, match="grid_range"):
        KANLayer(2, 2, grid_range=(1, 1))
    with pytest.raises(ValueError, match="grid_range"):
        KANLayer(2, 2, grid_range=3)
    with pytest.raises(ValueError, match="in_features"):
        KANLayer(0, 2)
    with pytest.raises(ValueError, match="x must have 2 features"):
        KANLayer(2, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="hidden"):
        GRKAN(4, hidden=0)
    with pytest.raises(ValueError, match="x must have 4 features"):
        GRKAN(4)(torch.randn(3, 5))
