"""The KAMoE gate (Inzirillo and Genet 2024) against the paper's formula, re-derived here.

The paper's gate, as the authors' code (github.com/remigenet/KAMoE) wires it:

    h        = ReLU(W_d x + b_d)
    eta      = KAN2(KAN1(h))          KAN1 with an ELU base, KAN2 with a SiLU base
    GLU(eta) = sigmoid(W_4 eta + b_4) * (W_5 eta + b_5)
    gates    = sigmoid(LayerNorm(W_s h + b_s + GLU(eta)))   dense, not renormalised

with a KAN layer ``y_o = sum_i W_b[o, i] base(x_i) + sum_i sum_j C[o, i, j] B_j(x_i)`` over
B-splines of degree p on the uniform grid of G cells over (lo, hi) extended by p cells on each
side. The reference below is written from those formulas alone (its own Cox-de Boor recursion,
ELU, SiLU and LayerNorm), in float64, and only borrows the module's weights.
"""

import pytest
import torch
from closeness import assert_close
from torch import nn

from gatezoo.blocks import GRKAN, GRKANRouter, make_router
from gatezoo.models import create_model

F64 = torch.float64


# --- the reference, from the formulas -----------------------------------------------------------


def knots(grid_size: int, order: int, lo: float, hi: float) -> list[float]:
    h = (hi - lo) / grid_size
    return [lo + (m - order) * h for m in range(grid_size + 2 * order + 1)]


def spline(m: int, q: int, x: torch.Tensor, t: list[float]) -> torch.Tensor:
    """B_{m,q}(x) by the Cox-de Boor recursion (uniform knots: no zero denominators)."""
    if q == 0:
        return ((x >= t[m]) & (x < t[m + 1])).to(x.dtype)
    return ((x - t[m]) / (t[m + q] - t[m]) * spline(m, q - 1, x, t)
            + (t[m + q + 1] - x) / (t[m + q + 1] - t[m + 1]) * spline(m + 1, q - 1, x, t))


def elu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.exp(x) - 1)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def kan(x: torch.Tensor, base_weight, spline_weight, base, t: list[float], order: int) -> torch.Tensor:
    """One KAN layer, edge by edge: (n, in) -> (n, out)."""
    n, width = x.shape
    out = base_weight.shape[0]
    y = torch.zeros(n, out, dtype=x.dtype)
    for i in range(width):
        xi = x[:, i]
        y += base(xi)[:, None] * base_weight[:, i]
        for j in range(spline_weight.shape[2]):
            y += spline(j, order, xi, t)[:, None] * spline_weight[:, i, j]
    return y


def layer_norm(v: torch.Tensor, gamma, beta, eps: float) -> torch.Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (v - mean) / torch.sqrt(var + eps) * gamma + beta


def paper_gate_logits(x: torch.Tensor, p: dict, t: list[float], order: int, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm(W_s h + b_s + GLU(KAN2(KAN1(h)))), h = ReLU(W_d x + b_d) (before the sigmoid);
    h = x when ``p`` has no input layer."""
    h = torch.clamp(x @ p["dense.weight"].T + p["dense.bias"], min=0) if "dense.weight" in p else x
    eta = kan(h, p["kan1.base_weight"], p["kan1.spline_weight"], elu, t, order)
    eta = kan(eta, p["kan2.base_weight"], p["kan2.spline_weight"], silu, t, order)
    glu = sigmoid(eta @ p["glu_gate.weight"].T + p["glu_gate.bias"]) * (eta @ p["glu_value.weight"].T
                                                                         + p["glu_value.bias"])
    return layer_norm(h @ p["skip.weight"].T + p["skip.bias"] + glu, p["norm.weight"], p["norm.bias"], eps)


def compact_gate_logits(x: torch.Tensor, p: dict, t: list[float], order: int, eps: float = 1e-5) -> torch.Tensor:
    """gatezoo's earlier gate: LayerNorm(W_s x + a * sigmoid(b)), [a | b] = KAN2(KAN1(x)), SiLU bases."""
    z = kan(x, p["kan1.base_weight"], p["kan1.spline_weight"], silu, t, order)
    z = kan(z, p["kan2.base_weight"], p["kan2.spline_weight"], silu, t, order)
    a, b = z[:, : z.shape[1] // 2], z[:, z.shape[1] // 2:]
    return layer_norm(x @ p["skip.weight"].T + a * sigmoid(b), p["norm.weight"], p["norm.bias"], eps)


def randomised(module: nn.Module, scale: float = 0.5) -> dict:
    """Every parameter of ``module`` replaced by random values (so no bias or norm weight is a
    trivial 0 or 1); returns the GRKAN's parameters by their names inside it, in float64."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    prefix = "grkan." if isinstance(module, GRKANRouter) else ""
    return {k[len(prefix):]: v.detach().to(F64).clone() for k, v in module.state_dict().items()}


# --- the paper's structure (the default) ----------------------------------------------------------


@pytest.mark.parametrize("order, grid_size, grid_range", [(3, 5, (-2.0, 2.0)), (1, 4, (-1.0, 3.0)), (2, 3, (0.0, 2.0))])
def test_default_router_is_the_papers_gate(order, grid_size, grid_range):
    dim, experts = 6, 3
    router = GRKANRouter(dim, experts, grid_size=grid_size, spline_order=order, grid_range=grid_range, dtype=F64)
    assert router.structure == "paper" and router.grkan.structure == "paper"
    assert router.grkan.dense_width == dim and router.grkan.hidden == experts  # documented defaults
    p = randomised(router)
    x = torch.randn(11, dim, dtype=F64)
    r = router(x)
    t = knots(grid_size, order, *grid_range)
    want = sigmoid(paper_gate_logits(x, p, t, order))
    assert_close("paper gates", want, r.weights.to(F64), 1e-6)  # weights are float32 by contract
    assert_close("paper gate logits", paper_gate_logits(x, p, t, order), router.grkan(x), 1e-12)
    assert r.weights.shape == r.indices.shape == (11, experts)
    assert (r.indices == torch.arange(experts)).all()  # dense: every expert for every token
    assert not torch.allclose(r.weights.sum(-1), torch.ones(11, dtype=torch.float32))  # not renormalised


def test_papers_gate_in_float32_matches_the_float64_reference():
    router = GRKANRouter(8, 4, grid_size=3)
    p = randomised(router)
    x = torch.randn(9, 8)
    t = knots(3, 3, -2.0, 2.0)
    want = sigmoid(paper_gate_logits(x.to(F64), p, t, 3))
    assert_close("float32 gates", want, router(x).weights, 1e-5)


def test_grkan_paper_structure_without_input_layer_and_shapes():
    g = GRKAN(5, hidden=3, out_features=4, grid_size=4, spline_order=2, dtype=F64)  # dense_width=None: h = x
    assert g.dense is None and g.kan2.out_features == 3 and g.skip.bias is not None
    assert isinstance(g.kan1.base_act, nn.ELU) and isinstance(g.kan2.base_act, nn.SiLU)
    p = randomised(g)
    x = torch.randn(2, 7, 5, dtype=F64)
    y = g(x)
    assert y.shape == (2, 7, 4)
    assert "dense.weight" not in p
    want = paper_gate_logits(x.reshape(-1, 5), p, knots(4, 2, -2.0, 2.0), 2).reshape(2, 7, 4)
    assert_close("GRKAN(h = x)", want, y, 1e-12)
    wide = GRKAN(5, hidden=3, out_features=4, dense_width=9)
    assert wide.dense.out_features == 9 and wide.kan1.in_features == 9 and wide.skip.in_features == 9
    assert wide(torch.randn(3, 5)).shape == (3, 4)


def test_gradients_reach_every_parameter_of_the_papers_gate():
    router = GRKANRouter(6, 3, grid_size=3, grid_range=(-1.0, 1.0))
    randomised(router)
    x = torch.randn(16, 6, requires_grad=True)
    r = router(x)
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    names = {n for n, _ in router.named_parameters()}
    assert {"grkan.dense.weight", "grkan.dense.bias", "grkan.skip.bias", "grkan.glu_gate.weight",
            "grkan.glu_value.bias"} <= names
    for name, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_papers_gate_gradcheck_float64():
    g = GRKAN(3, hidden=2, out_features=2, dense_width=4, grid_size=3, grid_range=(-1.0, 1.5), dtype=F64)
    randomised(g)
    names = [n for n, _ in g.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in g.parameters())
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(g, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_dropout_on_eta_in_training_only():
    g = GRKAN(4, hidden=6, out_features=3, dropout=0.5, grid_size=3)
    randomised(g)
    x = torch.randn(32, 4)
    g.eval()
    ref = GRKAN(4, hidden=6, out_features=3, grid_size=3)
    ref.load_state_dict(g.state_dict())
    assert torch.equal(g(x), ref(x))  # eval: no dropout
    g.train()
    assert not torch.allclose(g(x), ref(x))
    assert GRKANRouter(4, 2, dropout=0.25).grkan.dropout == 0.25


def test_base_activations_can_be_chosen_per_layer():
    g = GRKAN(4, base_activation=(nn.ReLU, nn.SiLU))  # the authors' code's KAN2 base (keras default 'relu')
    assert isinstance(g.kan1.base_act, nn.ReLU) and isinstance(g.kan2.base_act, nn.SiLU)
    both = GRKAN(4, base_activation=nn.GELU)
    assert isinstance(both.kan1.base_act, nn.GELU) and isinstance(both.kan2.base_act, nn.GELU)
    assert GRKAN(4, base_activation=None).kan1.base_weight is None
    with pytest.raises(ValueError, match="base_activation"):
        GRKAN(4, base_activation=(nn.ELU,))


# --- the compact structure (the earlier default) ------------------------------------------------


def old_default_state_dict(dim: int, experts: int, grid_size: int, order: int) -> dict:
    """A state dict laid out as the earlier default GRKANRouter saved it (hidden = 2 E, no input
    layer, KAN2 of width 2 E for the GLU halves, a bias-free skip), with random values."""
    hidden, nb = 2 * experts, grid_size + order
    shapes = {
        "grkan.kan1.base_weight": (hidden, dim), "grkan.kan1.spline_weight": (hidden, dim, nb),
        "grkan.kan2.base_weight": (2 * experts, hidden), "grkan.kan2.spline_weight": (2 * experts, hidden, nb),
        "grkan.skip.weight": (experts, dim), "grkan.norm.weight": (experts,), "grkan.norm.bias": (experts,),
    }
    return {k: torch.randn(s) * 0.5 for k, s in shapes.items()}


def test_compact_option_computes_the_earlier_default():
    dim, experts, grid_size, order = 5, 3, 3, 3
    old = old_default_state_dict(dim, experts, grid_size, order)
    router = GRKANRouter(dim, experts, structure="compact", grid_size=grid_size, spline_order=order)
    router.load_state_dict(old)  # strict: exactly the earlier keys and shapes
    assert router.state_dict().keys() == old.keys()
    x = torch.randn(10, dim)
    p = {k[len("grkan."):]: v.to(F64) for k, v in old.items()}
    want = sigmoid(compact_gate_logits(x.to(F64), p, knots(grid_size, order, -2.0, 2.0), order))
    assert_close("compact gates", want, router(x).weights, 1e-5)
    built = make_router("grkan", dim, experts, structure="compact", grid_size=grid_size, spline_order=order)
    assert built.state_dict().keys() == old.keys()
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in old.items()}


def test_compact_structure_refuses_paper_only_arguments():
    with pytest.raises(ValueError, match="dense_width"):
        GRKANRouter(4, 2, structure="compact", dense_width=4)
    with pytest.raises(ValueError, match="dropout"):
        GRKAN(4, structure="compact", dropout=0.1)
    with pytest.raises(ValueError, match="structure"):
        GRKANRouter(4, 2, structure="kamoe")
    with pytest.raises(TypeError, match="structure"):
        GRKAN(4, structure=1)
    with pytest.raises(ValueError, match="dense_width"):
        GRKANRouter(4, 2, dense_width=0)
    with pytest.raises(ValueError, match="dropout"):
        GRKAN(4, dropout=1.0)


# --- checkpoints ------------------------------------------------------------------------------


def test_compact_checkpoint_into_the_new_default_says_how_to_build_it():
    old = old_default_state_dict(6, 3, 5, 3)
    router = GRKANRouter(6, 3)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"compact GRKAN structure.*structure='compact'.*"
                                             r"router_args=\{'structure': 'compact'\}"):
            router.load_state_dict(old, strict=strict)
    compact = GRKANRouter(6, 3, structure="compact")
    compact.load_state_dict(old)
    with pytest.raises(ValueError, match=r"paper's GRKAN structure.*structure='paper'"):
        compact.load_state_dict(GRKANRouter(6, 3).state_dict())
    same = GRKANRouter(6, 3)
    same.load_state_dict(router.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(same(x).weights, router(x).weights)


def test_grkan_checkpoints_of_the_other_structure_or_input_layer_are_refused():
    with pytest.raises(ValueError, match=r"saved with the 'compact' structure.*structure='compact'"):
        GRKAN(4).load_state_dict(GRKAN(4, structure="compact").state_dict())
    with pytest.raises(ValueError, match=r"saved with the 'paper' structure"):
        GRKAN(4, structure="compact").load_state_dict(GRKAN(4).state_dict())
    with pytest.raises(ValueError, match="dense_width"):
        GRKAN(4).load_state_dict(GRKAN(4, dense_width=4).state_dict())


def test_compact_model_checkpoint_into_the_default_model_names_the_router():
    def model(**router_args):
        return create_model("vit_tiny_moe", dim=16, depth=1, heads=2, img_size=8, patch_size=4, num_experts=3,
                            router="grkan", router_args=router_args)

    state = model(structure="compact").state_dict()
    with pytest.raises(ValueError, match=r"GRKANRouter state dict at '.*router\.'.*router_args=\{'structure'"):
        model().load_state_dict(state)
    restored = model(structure="compact")
    restored.load_state_dict(state)
    x = torch.randn(2, 1, 8, 8)
    assert torch.isfinite(restored.eval()(x)).all()


def test_parameter_counts_are_the_documented_layers():
    dim, experts, nb = 12, 4, 5 + 3
    paper = GRKANRouter(dim, experts)
    compact = GRKANRouter(dim, experts, structure="compact")
    count = sum(p.numel() for p in paper.parameters())
    want = (dim * dim + dim) + (experts * dim * (nb + 1)) + experts * experts * (nb + 1) + (dim * experts + experts) \
        + 2 * (experts * experts + experts) + 2 * experts
    assert count == want
    hidden = 2 * experts
    assert sum(p.numel() for p in compact.parameters()) == hidden * dim * (nb + 1) + 2 * experts * hidden * (nb + 1) \
        + dim * experts + 2 * experts
