"""Hyper-gated layers of Self-Tuning Networks: forward and every gradient against a float64
composition, the exact best response of the paper's shallow linear example (ridge regression)
as a sigmoid-gated HyperLinear, training towards it, RateDropout and hyper_gate."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatezoo.blocks import HyperConv2d, HyperLinear, RateDropout, hyper_gate, hyper_layers, set_hyperparameters


def _reference(layer, x, h):
    """The layer's formula in float64: s (W x + b) + g_w(h) (W_h x) + g_b(h) b_h."""
    d = torch.float64
    g = h.to(d) @ layer.gate_proj.weight.to(d).t()
    if layer.gate_proj.bias is not None:
        g = g + layer.gate_proj.bias.to(d)
    if layer.gate == "sigmoid":
        g = torch.sigmoid(g)
    gw, gb = g.chunk(2, dim=-1)
    x = x.to(d)
    if isinstance(layer, HyperLinear):
        elem = F.linear(x, layer.weight.to(d), None if layer.bias is None else layer.bias.to(d))
        out = layer.elem_scale.to(d) * elem + gw * F.linear(x, layer.hnet_weight.to(d))
        return out + gb * layer.hnet_bias.to(d) if layer.hnet_bias is not None else out
    conv = lambda w, b=None: F.conv2d(x, w.to(d), None if b is None else b.to(d), layer.stride, layer.padding)  # noqa: E731
    out = layer.elem_scale.to(d) * conv(layer.weight, layer.bias) + gw[:, :, None, None] * conv(layer.hnet_weight)
    return out + (gb * layer.hnet_bias.to(d))[:, :, None, None] if layer.hnet_bias is not None else out


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("gate", ["linear", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hyper_layers_match_float64_with_every_gradient(kind, gate, dtype):
    torch.manual_seed(1)
    if kind == "linear":
        layer = HyperLinear(5, 7, 3, gate=gate, dtype=dtype)
        x = torch.randn(5, 9, dtype=dtype).t()  # a transposed (non-contiguous) view
    else:
        layer = HyperConv2d(3, 4, 3, 3, padding=1, stride=2, gate=gate, dtype=dtype)
        x = torch.randn(9, 3, 7, 5, dtype=dtype).transpose(2, 3)
    assert not x.is_contiguous()
    nn.init.normal_(layer.gate_proj.weight)  # a gate far from 0, so it matters
    h = torch.randn(9, 3, dtype=dtype, requires_grad=True)
    x.requires_grad_(True)
    y = layer(x, h)
    ref = _reference(layer, x, h)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.double(), ref, **tol)
    g = torch.randn_like(ref)
    params = [x, h, *layer.parameters()]
    got = torch.autograd.grad(y, params, g.to(dtype))
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a.double(), b.double(), **tol)
    # one row of hyperparameters for the whole batch equals that row repeated
    torch.testing.assert_close(layer(x, h[0].detach()), layer(x, h[:1].detach().expand(9, 3)))


def test_hyper_layers_refuse_missing_or_misshapen_hyperparameters():
    layer = HyperLinear(4, 3, 2)
    with pytest.raises(ValueError, match="needs hyperparameters"):
        layer(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"hparams must have shape \(2,\), \(1, 2\) or \(5, 2\)"):
        layer(torch.randn(5, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match="gate must be one of"):
        HyperLinear(4, 3, 2, gate="tanh")
    set_hyperparameters(layer, torch.zeros(2))
    assert layer(torch.randn(5, 4)).shape == (5, 3)


def _ridge_problem():
    g = torch.Generator().manual_seed(0)
    d, n = 3, 200
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([2.0, 1.0, 0.3], dtype=torch.float64)) @ rot
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def test_exact_best_response_of_the_linear_jacobian_example_is_a_sigmoid_gated_layer():
    """y = s^T Q x with the penalty lambda ||dy/dx||^2 = lambda ||Q^T s||^2 is ridge regression in
    u = Q^T s: u*(lambda) = (S + lambda I)^-1 S_xy = V diag(d_i / (d_i + lambda)) V^T u_ols, and
    d_i / (d_i + lambda) = sigmoid(log d_i - log lambda). So Q = diag(sigmoid(-h + log d)) V^T with
    h = log lambda, s = V^T u_ols: a HyperLinear with the sigmoid gate, exactly, for every lambda."""
    x, y = _ridge_problem()
    n, dim = x.shape
    cov, cxy = x.T @ x / n, x.T @ y / n
    d, v = torch.linalg.eigh(cov)
    layer = HyperLinear(dim, dim, 1, bias=False, gate="sigmoid", dtype=torch.float64)
    head = nn.Linear(dim, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.elem_scale.zero_()
        layer.hnet_weight.copy_(v.T)
        layer.gate_proj.weight.zero_()
        layer.gate_proj.weight[:dim, 0] = -1.0
        layer.gate_proj.bias.zero_()
        layer.gate_proj.bias[:dim] = d.log()
        head.weight.copy_((v.T @ torch.linalg.solve(cov, cxy)).unsqueeze(0))
    for lam in torch.logspace(-4, 3, 15, dtype=torch.float64).tolist():
        ridge = torch.linalg.solve(cov + lam * torch.eye(dim, dtype=torch.float64), cxy)
        u = head(layer(torch.eye(dim, dtype=torch.float64), torch.tensor([math.log(lam)], dtype=torch.float64)))
        torch.testing.assert_close(u.squeeze(-1), ridge, rtol=1e-10, atol=1e-12)


def test_training_the_hyper_network_approaches_the_best_response():
    """The self-tuning inner problem on the same example: minimise the penalised loss at a random
    lambda per step. The trained network's excess loss over the best response, averaged over
    lambda in [1e-3, 1e2], ends far below what any lambda-independent weights can reach."""
    torch.manual_seed(0)
    x, y = _ridge_problem()
    n, dim = x.shape
    cov, cxy = x.T @ x / n, x.T @ y / n
    layer = HyperLinear(dim, dim, 1, bias=False, gate="sigmoid", dtype=torch.float64)
    head = nn.Linear(dim, 1, bias=False, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)

    def u_of(h):
        return head(layer(eye, torch.tensor([h], dtype=torch.float64))).squeeze(-1)

    def loss(u, lam):
        return ((x @ u - y) ** 2).mean() + lam * (u ** 2).sum()

    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6000)
    lo, hi = math.log(1e-3), math.log(1e2)
    for _ in range(6000):
        h = lo + (hi - lo) * float(torch.rand(()))
        opt.zero_grad()
        loss(u_of(h), math.exp(h)).backward()
        opt.step()
        sched.step()
    grid = [math.exp(h) for h in torch.linspace(lo, hi, 11).tolist()]
    best = {lam: torch.linalg.solve(cov + lam * eye, cxy) for lam in grid}
    constant = torch.linalg.solve(cov + sum(grid) / len(grid) * eye, cxy)  # the best lambda-free weights
    with torch.no_grad():
        stn = sum(float(loss(u_of(math.log(lam)), lam) / loss(best[lam], lam) - 1) for lam in grid) / len(grid)
        fixed = sum(float(loss(constant, lam) / loss(best[lam], lam) - 1) for lam in grid) / len(grid)
    assert stn < 0.05 and stn < fixed / 100, (stn, fixed)


def test_rate_dropout_uses_per_example_rates():
    torch.manual_seed(0)
    drop = RateDropout(1)
    x = torch.ones(4, 1000)
    assert torch.equal(drop(x), x)  # no rate set
    drop.values = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.0, 0.9], [0.0, 0.2]])
    y = drop(x)
    kept = (y != 0).float().mean(1)
    torch.testing.assert_close(kept, torch.tensor([1.0, 0.5, 0.1, 0.8]), atol=0.05, rtol=0)
    torch.testing.assert_close(y.mean(1), torch.ones(4), atol=0.15, rtol=0)  # scaled by 1 / (1 - p)
    assert torch.equal(drop.eval()(x), x)
    drop.train().values = torch.tensor([[0.0, 1.0]] * 4)
    with pytest.raises(ValueError, match=r"dropout rates must lie in \[0, 1\)"):
        drop(x)


def test_hyper_gate_converts_a_model_and_keeps_its_function_at_a_zero_gate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
    x = torch.randn(2, 1, 5, 5)
    before = model(x)
    hyper_gate(model, 2)
    assert [type(m).__name__ for m in hyper_layers(model)] == ["HyperConv2d", "HyperLinear"]
    for m in hyper_layers(model):
        nn.init.zeros_(m.gate_proj.weight)
    set_hyperparameters(model, torch.randn(2))
    torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="found no"):  # a second call finds nothing left (gate projections stay)
        hyper_gate(model, 2)
    partial = hyper_gate(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), 1, select=lambda name, m: name == "1")
    assert [type(m).__name__ for m in partial] == ["Linear", "HyperLinear"]
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv2d"):
        hyper_gate(nn.Sequential(nn.ReLU()), 2)
