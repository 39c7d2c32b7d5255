"""gatezoo.stats.moe: the Gaussian mixture of experts against known answers (one expert is linear
regression; a Gaussian density by hand), EM's likelihood never decreasing, recovery of a
well-separated truth, the gate's translation, and refused input."""

import math

import pytest
import torch

from gatezoo.stats import GaussianMoE, fit_em

F64 = torch.float64


def _truth(gate="softmax", **kw):
    return GaussianMoE(beta1=[[2.0, -1.0], [0.0, 0.0]], beta0=[0.5, 0.0], a=[[1.0, 2.0], [-2.0, 0.5]],
                       b=[0.5, -1.0], var=[0.05, 0.1], gate=gate, **kw)


def test_log_density_is_the_mixture_written_out():
    m = _truth()
    x, y = m.sample(7, seed=1)
    gate = torch.softmax(x @ m.beta1.T + m.beta0, dim=1)
    mean = x @ m.a.T + m.b
    dens = (gate * torch.exp(-(y[:, None] - mean) ** 2 / (2 * m.var)) / torch.sqrt(2 * math.pi * m.var)).sum(1)
    torch.testing.assert_close(m.log_density(x, y), dens.log(), rtol=1e-12, atol=1e-12)


def test_one_expert_em_is_linear_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 + 0.2 * torch.randn(300, generator=g, dtype=F64)
    fit = fit_em(x, y, 1, restarts=1)
    xb = torch.cat([x, torch.ones(300, 1, dtype=F64)], dim=1)
    coef = torch.linalg.lstsq(xb, y[:, None]).solution.squeeze(1)
    torch.testing.assert_close(fit.model.a[0], coef[:3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fit.model.b[0], coef[3], rtol=1e-8, atol=1e-10)
    rss = float(((y - xb @ coef) ** 2).mean())
    assert fit.model.var[0].item() == pytest.approx(rss, rel=1e-8)


@pytest.mark.parametrize("gate", ["softmax", "modified"])
def test_em_never_lowers_the_likelihood_and_recovers_a_separated_truth(gate):
    truth = _truth(gate)
    x, y = truth.sample(4000, seed=3)
    fit = fit_em(x, y, 2, gate=gate, restarts=3, seed=0)
    assert all(b >= a - 1e-10 for a, b in zip(fit.trace, fit.trace[1:]))
    assert fit.log_likelihood >= truth.log_likelihood(x, y) - 1e-9  # the MLE beats the truth on its sample
    # match the fitted experts to the true ones by slope, then compare in the canonical form
    order = [int(torch.argmin(((fit.model.a - truth.a[i]) ** 2).sum(1))) for i in range(2)]
    assert sorted(order) == [0, 1]
    got = fit.model
    torch.testing.assert_close(got.a[order], truth.a, atol=0.05, rtol=0)
    torch.testing.assert_close(got.var[order], truth.var, atol=0.01, rtol=0)
    gate_fit = got.gate_logits(x).softmax(1)[:, order]
    assert float((gate_fit - truth.gate_logits(x).softmax(1)).abs().mean()) < 0.03


def test_gate_translation_changes_nothing_and_canonical_removes_it():
    m = _truth()
    shifted = GaussianMoE(beta1=m.beta1 + torch.tensor([0.7, -0.3], dtype=F64), beta0=m.beta0 + 2.0, a=m.a, b=m.b,
                          var=m.var)
    x, y = m.sample(50, seed=2)
    torch.testing.assert_close(shifted.log_density(x, y), m.log_density(x, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shifted.canonical().beta1, m.canonical().beta1)
    torch.testing.assert_close(shifted.canonical().beta0, m.canonical().beta0)


def test_topk_gate_zeroes_the_unchosen_experts():
    m = GaussianMoE(beta1=[[1.0], [0.0], [-1.0]], beta0=[0.0, 0.2, 0.0], a=[[1.0], [0.0], [-1.0]], b=[0, 0, 0],
                    var=[1, 1, 1], gate="topk", top_k=2)
    x = torch.tensor([[2.0], [-2.0]], dtype=F64)
    probs = m.gate_log_probs(x).exp()
    assert probs[0, 2] == 0 and probs[1, 0] == 0
    torch.testing.assert_close(probs.sum(1), torch.ones(2, dtype=F64))


@pytest.mark.parametrize("call, match", [
    (lambda: fit_em(torch.randn(50, 2), torch.randn(50), 0), "k must be an int >= 1"),
    (lambda: fit_em(torch.randn(8, 2), torch.randn(8), 2), "cannot identify the 11 parameters"),
    (lambda: fit_em(torch.tensor([[float("nan"), 1.0]] * 20), torch.randn(20), 1), "x must be finite"),
    (lambda: fit_em(torch.randn(20, 2), torch.randn(19), 1), "y \\(n,\\)"),
    (lambda: GaussianMoE([[1.0]], [0.0], [[1.0]], [0.0], [0.0]), "var must be > 0"),
    (lambda: GaussianMoE([[1.0]], [0.0], [[1.0]], [0.0], [1.0], gate="topk", top_k=2), "top_k must be an int in"),
    (lambda: GaussianMoE([[1.0]], [0.0], [[1.0]], [0.0], [1.0], gate="sparse"), "gate must be one of"),
    (lambda: GaussianMoE([[1.0, 2.0]], [0.0], [[1.0]], [0.0], [1.0]), "a must have shape"),
    (lambda: _truth().sample(0), "n must be an int >= 1"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- Voronoi losses ----------------------------------------------------------------------------


def _with(m, **changes):
    from dataclasses import replace

    return replace(m, **{k: torch.as_tensor(v, dtype=F64) for k, v in changes.items()})


def test_voronoi_loss_is_zero_at_the_truth_and_blind_to_the_gate_translation():
    from gatezoo.stats import voronoi_loss

    m = _truth()
    assert voronoi_loss(m, m) == 0.0
    shifted = _with(m, beta1=m.beta1 + torch.tensor([3.0, -1.0], dtype=F64), beta0=m.beta0 - 5.0)
    assert voronoi_loss(shifted, m) == pytest.approx(0.0, abs=1e-12)
    moved = _with(m, b=m.b + torch.tensor([0.1, 0.0], dtype=F64))
    weight = float(torch.softmax(m.beta0, 0)[0])
    assert voronoi_loss(moved, m) == pytest.approx(weight * 0.1, rel=1e-12)  # one exact-fitted atom moved


def test_voronoi_loss_of_a_split_atom_uses_the_cell_exponent():
    from gatezoo.stats import voronoi_cells, voronoi_loss

    m = _truth()
    # the first true atom split into two atoms of half its weight: the same mixing measure
    split = GaussianMoE(beta1=torch.cat([m.beta1[:1], m.beta1]), beta0=torch.cat([m.beta0[:1], m.beta0]) -
                        torch.tensor([math.log(2), math.log(2), 0.0], dtype=F64), a=torch.cat([m.a[:1], m.a]),
                        b=torch.cat([m.b[:1], m.b]), var=torch.cat([m.var[:1], m.var]))
    x, y = m.sample(20, seed=0)
    torch.testing.assert_close(split.log_density(x, y), m.log_density(x, y))
    assert voronoi_cells(split, m) == [0, 0, 1]
    assert voronoi_loss(split, m) == pytest.approx(0.0, abs=1e-12)
    # move one of the two atoms' intercepts by 0.1: the term is its weight times 0.1^rbar(2) = 0.1^4
    moved = _with(split, b=split.b + torch.tensor([0.1, 0.0, 0.0], dtype=F64))
    weight = float(torch.softmax(split.beta0, 0)[0])
    assert voronoi_loss(moved, m) == pytest.approx(weight * 0.1 ** 4, rel=1e-9)
