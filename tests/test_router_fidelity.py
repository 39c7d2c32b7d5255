"""The routers against their papers' formulas, re-derived here in float64 with plain loops
(docs/routing.md, 'Fidelity to the papers'): DeepSeek-V3's selection bias (eq. 16) for softmax
and sigmoid scores, AdaMoLE's auxiliary loss as the authors' code computes it, the gate
intercepts of the Gumbel-softmax and modified-softmax gates, Shazeer's zero initialisation, and
the checkpoints saved before these defaults."""

import math

import numpy as np
import pytest
import torch
from closeness import assert_close

from gatezoo.blocks import (
    AdaptiveThresholdRouter,
    GumbelSoftmaxRouter,
    ModifiedSoftmaxRouter,
    MoEFeedForward,
    MoLELinear,
    TopKRouter,
)
from gatezoo.blocks.routing import adamole_aux_loss
from gatezoo.kernels.routing import route

D, E = 6, 8
BACKENDS = ("torch", "triton")


# --- DeepSeek-V3 eq. 16, re-derived ------------------------------------------------------------


def eq16(logits: np.ndarray, bias: np.ndarray, k: int, score: str) -> list[dict]:
    """Per token, in float64 with Python loops: the scores s (softmax or sigmoid of the logits),
    the selection values s_i + b_i, the k experts with the largest of them (ties to the lower
    expert) and their weights, s_i over the sum of the selected s."""
    out = []
    for row in logits.astype(np.float64):
        if score == "softmax":
            top = max(row)
            ex = [math.exp(v - top) for v in row]
            s = [v / sum(ex) for v in ex]
        else:
            s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        value = [s[i] + float(bias[i]) for i in range(len(row))]
        order = sorted(range(len(row)), key=lambda i: (-value[i], i))
        chosen = order[:k]
        total = sum(s[i] for i in chosen)
        gap = value[order[k - 1]] - value[order[k]] if k < len(row) else math.inf
        out.append({"chosen": chosen, "weights": [s[i] / total for i in chosen], "s": s, "value": value,
                    "gap": gap})
    return out


def _inputs(score: str, n: int = 40, seed: int = 0):
    """Random logits and a bias the size of the scores (so that it changes some selections
    without deciding them alone), then rows with exact ties: tied experts share the row's top
    logit, 0 (exp(0) = 1 and sigmoid(0) = 1/2 on every implementation, so the tie is exact in
    float32 and float64 alike), and the same bias, the largest; among them the lower expert must
    win."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, E, generator=gen)
    bias = 0.3 * torch.rand(E, generator=gen) * (1.0 if score == "sigmoid" else 0.5)
    bias[[2, 5, 6]] = bias.max().item()  # experts 2, 5 and 6 share the largest bias value
    ties = -1 - torch.rand(8, E, generator=gen)  # every other logit below the tied top logit 0
    ties[:4, [2, 5, 6]] = 0.0  # three tied experts, k = 2 of them at most
    ties[4:, :] = 0.0  # a zero-initialised router: every score ties, the bias decides
    return torch.cat([logits, ties]), bias, range(n, n + 8)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_is_eq16_rederived_in_float64(score, k):
    logits, bias, tie_rows = _inputs(score)
    ref = eq16(logits.numpy(), bias.numpy(), k, score)
    unbiased = eq16(logits.numpy(), np.zeros(E), k, score)
    assert sum(sorted(a["chosen"]) != sorted(b["chosen"]) for a, b in zip(ref, unbiased)) > 0  # the bias matters
    decided = [n for n, row in enumerate(ref) if n in tie_rows or row["gap"] > 1e-5]
    assert len(decided) > 0.8 * len(ref)
    for backend in BACKENDS:
        r = route(logits, k, bias=bias, score=score, backend=backend)
        for n, row in enumerate(ref):
            got = r.indices[n].tolist()
            if n in decided:  # exactly the paper's choice, in its order
                assert got == row["chosen"], (backend, n, got, row["chosen"])
            # every row, near ties included: nothing left out beats a selected expert by over 1e-5
            left_out = [row["value"][i] for i in range(E) if i not in got]
            assert min(row["value"][i] for i in got) >= max(left_out, default=-math.inf) - 1e-5, (backend, n)
            want = torch.tensor([row["s"][i] for i in got], dtype=torch.float64)
            assert_close(f"{backend} weights row {n}", want / want.sum(), r.weights[n], 1e-6)
        # the ties went to the lower expert: experts 2 and 5 before 6
        assert all(6 not in r.indices[n].tolist() or k == 3 for n in list(tie_rows)[:4]), backend


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_topk_router_is_eq16_and_the_old_rule_differs(score):
    """The router itself (its own logits W_g x) against the re-derivation, on both backends;
    adding the bias to the logits instead selects other experts for some tokens."""
    torch.manual_seed(1)
    x = torch.randn(48, D)
    for backend in BACKENDS:
        router = TopKRouter(D, E, k=2, selection_bias=True, score=score, backend=backend)
        with torch.no_grad():
            router.selection_bias.copy_(0.1 * torch.randn(E))
        r = router(x)
        logits = (x.double() @ router.gate.weight.detach().double().T).numpy()
        ref = eq16(logits, router.selection_bias.double().numpy(), 2, score)
        decided = [n for n, row in enumerate(ref) if row["gap"] > 1e-5]
        assert len(decided) > 40
        for n in decided:
            assert r.indices[n].tolist() == ref[n]["chosen"], (backend, n)
            assert_close(f"weights {n}", torch.tensor(ref[n]["weights"], dtype=torch.float64), r.weights[n], 1e-6)
        old = TopKRouter(D, E, k=2, selection_bias=True, score=score, bias_on="logits", backend=backend)
        old.load_state_dict(router.state_dict())
        assert (old(x).indices.sort(-1).values != r.indices.sort(-1).values).any(-1).sum() > 0


def test_topk_sigmoid_probs_are_the_normalised_affinities():
    """DeepSeek-V3 eq. 19: s'_i = s_i / sum_j s_j, what the balance loss's P averages."""
    router = TopKRouter(D, E, k=2, score="sigmoid")
    x = torch.randn(10, D, dtype=torch.float64)
    s = torch.sigmoid(x @ router.gate.weight.double().T)
    assert_close("probs", s / s.sum(-1, keepdim=True), router(x).probs, 1e-12)


def test_old_selection_bias_checkpoints_load_and_bias_on_logits_computes_what_they_computed():
    """A state dict of the old rule (built here as the old variant, bias_on="logits") keeps its
    buffer name, so it loads into the new default; bias_on="logits" reproduces the old routing:
    top-k of l + b, weights softmax over the selected l."""
    old = TopKRouter(D, E, k=2, selection_bias=True, bias_on="logits")
    old.update_bias(torch.arange(E))  # a learned, non-zero bias
    state = old.state_dict()
    assert set(state) == {"gate.weight", "selection_bias"}
    TopKRouter(D, E, k=2, selection_bias=True).load_state_dict(state)  # loads (with the new rule)
    again = TopKRouter(D, E, k=2, selection_bias=True, bias_on="logits")
    again.load_state_dict(state)
    x = torch.randn(20, D)
    logits = x @ state["gate.weight"].T
    top = torch.sort(logits + state["selection_bias"], dim=-1, descending=True, stable=True).indices[:, :2]
    r = again(x)
    assert torch.equal(r.indices, top)
    assert_close("old weights", torch.softmax(logits.gather(1, top), -1), r.weights, 1e-6)


def test_shazeer_initialises_the_noisy_gate_at_zero():
    """Shazeer et al. 2017 (appendix A): W_g and W_noise start at zero, so a noisy router starts
    as pure noise; clean routers keep nn.Linear's init unless zero_init=True."""
    noisy = TopKRouter(D, E, noisy=True)
    assert noisy.zero_init and (noisy.gate.weight == 0).all() and (noisy.noise.weight == 0).all()
    assert not TopKRouter(D, E).zero_init
    noisy.train()
    x = torch.randn(200, D)
    assert len(set(map(tuple, noisy(x).indices.sort(-1).values.tolist()))) > 1  # the noise alone picks
    noisy.eval()
    assert (noisy(x).indices == torch.tensor([0, 1])).all()  # no noise: all logits tie


# --- AdaMoLE's auxiliary loss, as the authors' code computes it --------------------------------


def adamole_reference(x: np.ndarray, wg: np.ndarray, wt: np.ndarray, bt: float, tau_max: float) -> float:
    """zefang-liu/AdaMoLE, AdaMoeLayer: p = softmax(W_g x), tau = tau_max sigmoid(w_t x + b_t),
    selected = (p - tau >= 0), f_i = sum_n selected_ni / N, P_i = sum_n (p_ni - tau_n) / N,
    loss = E sum_i f_i P_i; loops in float64."""
    n_tok, n_exp = x.shape[0], wg.shape[0]
    counts, sums = [0.0] * n_exp, [0.0] * n_exp
    for n in range(n_tok):
        logits = [sum(wg[i, j] * x[n, j] for j in range(x.shape[1])) for i in range(n_exp)]
        top = max(logits)
        ex = [math.exp(v - top) for v in logits]
        p = [v / sum(ex) for v in ex]
        tau = tau_max / (1.0 + math.exp(-(sum(wt[j] * x[n, j] for j in range(x.shape[1])) + bt)))
        for i in range(n_exp):
            counts[i] += 1.0 if p[i] - tau >= 0 else 0.0
            sums[i] += p[i] - tau
    return n_exp * sum((counts[i] / n_tok) * (sums[i] / n_tok) for i in range(n_exp))


@pytest.mark.parametrize("tau_max", [None, 0.3])
def test_adamole_aux_loss_is_the_authors(tau_max):
    router = AdaptiveThresholdRouter(D, E, tau_max=tau_max, aux_loss_coef=1e-3)
    x = torch.randn(30, D, dtype=torch.float64)
    r = router(x)
    want = adamole_reference(x.numpy(), router.gate.weight.double().detach().numpy(),
                             router.threshold.weight.double().detach().numpy()[0],
                             float(router.threshold.bias.detach()), router.tau_max)
    assert set(r.aux) == {"adamole"}
    assert r.aux["adamole"].item() == pytest.approx(1e-3 * want, rel=1e-10, abs=1e-15)
    assert not AdaptiveThresholdRouter(D, E).forward(x).aux  # off by default


def test_adamole_aux_loss_gradient_reaches_gate_and_threshold_with_f_held():
    """f is a count (no gradient); p - tau carries it to W_g and to the threshold network:
    finite differences of the loss agree where no p crosses its threshold."""
    torch.manual_seed(2)
    x = torch.randn(12, D, dtype=torch.float64)
    router = AdaptiveThresholdRouter(D, 4, dtype=torch.float64)
    wg, wt = router.gate.weight, router.threshold.weight

    def loss(g, t):
        probs = torch.softmax(x @ g.T, -1)
        tau = router.tau_max * torch.sigmoid(x @ t.T + router.threshold.bias)
        return adamole_aux_loss(probs, tau)

    assert torch.autograd.gradcheck(loss, (wg.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()))
    router.aux_loss_coef = 1.0
    router(x).aux["adamole"].backward()
    assert wg.grad.abs().sum() > 0 and wt.grad.abs().sum() > 0


def test_adamole_aux_loss_reaches_a_mole_layer_aux_loss():
    layer = MoLELinear(D, 5, num_experts=4, rank=2, router_args={"aux_loss_coef": 1e-3})
    x = torch.randn(3, 7, D)
    layer(x)
    assert set(layer.last_aux) == {"adamole"}  # MoLELinear's balance_coef is 0: the authors' loss alone
    assert torch.equal(layer.aux_loss.detach(), layer.last_aux["adamole"].float())


# --- the gate intercepts -----------------------------------------------------------------------


def test_modified_softmax_has_the_papers_beta0():
    router = ModifiedSoftmaxRouter(D, E)
    x = 2 * torch.randn(9, D, dtype=torch.float64)
    b0, b1 = router.gate.bias.double(), router.gate.weight.double()
    want = torch.softmax(torch.tanh(x) @ b1.T + b0, -1)
    r = router(x)
    got = torch.zeros_like(want).scatter(1, r.indices, r.weights.double())
    assert_close("softmax(beta_1 M(x) + beta_0)", want, got, 1e-6)


def test_gumbel_gate_has_an_intercept_like_the_gg_moe_code():
    router = GumbelSoftmaxRouter(D, E, tau=0.5, samples=3).eval()
    x = torch.randn(7, D, dtype=torch.float64)
    logits = x @ router.gate.weight.double().T + router.gate.bias.double()
    g = router.eval_noise(dtype=torch.float64)
    want = torch.softmax((logits[:, None, :] + g) / 0.5, -1).mean(1)
    r = router(x)
    assert_close("eval mean", want, torch.zeros_like(want).scatter(1, r.indices, r.weights.double()), 1e-6)
    assert_close("logits", logits, r.logits, 1e-12)


@pytest.mark.parametrize("cls", [GumbelSoftmaxRouter, ModifiedSoftmaxRouter])
def test_checkpoints_without_the_gate_intercept_load_with_it_at_zero(cls):
    """A state dict saved before the intercept existed (built here as the old variant,
    gate_bias=False) loads into the default router, strictly, as a plain dict (a safetensors
    file has no module versions) or with its version-1 metadata, and computes what it computed;
    a version-2 state dict without the bias is refused as usual."""
    old = cls(D, E, gate_bias=False).eval()
    x = torch.randn(5, D)
    before = old(x)
    saved = old.state_dict()
    assert "gate.bias" not in saved
    plain = dict(saved)  # no _metadata, as from safetensors
    v1 = saved.copy()
    v1._metadata = {key: {**meta, "version": 1} for key, meta in saved._metadata.items()}
    for state in (plain, v1):
        new = cls(D, E).eval()
        new.load_state_dict(state)
        assert (new.gate.bias == 0).all()
        after = new(x)
        assert torch.equal(after.indices, before.indices)
        assert_close("same function", before.weights.double(), after.weights, 1e-6)
    with pytest.raises(RuntimeError, match="gate.bias"):
        cls(D, E).load_state_dict(saved)  # version 2: no silent fill


def test_old_moe_checkpoints_with_a_gumbel_router_load_into_the_new_default():
    old = MoEFeedForward(D, 8, num_experts=4, router="gumbel", router_args={"gate_bias": False}).eval()
    x = torch.randn(6, D)
    state = dict(old.state_dict())
    new = MoEFeedForward(D, 8, num_experts=4, router="gumbel").eval()
    new.load_state_dict(state)
    assert_close("layer output", old(x).double(), new(x), 1e-6)


# --- the new arguments' checks ----------------------------------------------------------------


@pytest.mark.parametrize("build, exc, match", [
    (lambda: TopKRouter(D, E, score="tanh"), ValueError, r"score must be one of \('softmax', 'sigmoid'\)"),
    (lambda: TopKRouter(D, E, score=1), TypeError, "score must be one of"),
    (lambda: TopKRouter(D, E, bias_on="weights"), ValueError, r"bias_on must be one of \('scores', 'logits'\)"),
    (lambda: TopKRouter(D, E, zero_init=1), TypeError, "zero_init must be true or false"),
    (lambda: GumbelSoftmaxRouter(D, E, gate_bias="no"), TypeError, "gate_bias must be true or false"),
    (lambda: ModifiedSoftmaxRouter(D, E, gate_bias=None), TypeError, "gate_bias must be true or false"),
    (lambda: AdaptiveThresholdRouter(D, E, aux_loss_coef=-1e-3), ValueError, "aux_loss_coef must be a finite"),
    (lambda: AdaptiveThresholdRouter(D, E, aux_loss_coef="1e-3"), TypeError, "aux_loss_coef must be a finite"),
])
def test_bad_options_name_the_argument(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize("router_args", [{"selection_bias": True, "score": "sigmoid"},
                                         {"selection_bias": True, "bias_on": "logits"}],
                         ids=["sigmoid", "bias_on_logits"])
def test_new_options_trace_without_graph_breaks(router_args):
    """The defaults are traced by tests/test_compile.py; the new options must trace too."""
    layer = MoEFeedForward(D, 8, num_experts=4, router_args=router_args)
    with torch.no_grad():
        layer.router.selection_bias.copy_(0.1 * torch.randn(4))
    x = torch.randn(2, 3, D)
    for train in (True, False):
        layer.train(train)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(x)
        assert explained.graph_count >= 1 and not explained.break_reasons, (train, explained.break_reasons)
