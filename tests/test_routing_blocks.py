"""Routers, their registry and the auxiliary losses (docs/architecture.md, 'The math',
'Routers and mixtures of experts')."""

import copy
import math

import pytest
import torch
from closeness import assert_close

from gatezoo.blocks import (
    ROUTERS,
    AdaptiveThresholdRouter,
    GRKANRouter,
    GumbelSoftmaxRouter,
    ModifiedSoftmaxRouter,
    RoutingResult,
    SoftmaxRouter,
    TaskAwareRouter,
    TopKRouter,
    make_router,
    router_z_loss,
    switch_balance_loss,
)

D, E = 6, 4


def dense(r: RoutingResult, num_experts: int = E) -> torch.Tensor:
    w = torch.where(r.keep, r.weights, 0) if r.keep is not None else r.weights
    return torch.zeros(r.weights.shape[0], num_experts).scatter_add(1, r.indices, w)


def test_registry_names_every_router():
    assert set(ROUTERS) == {"softmax", "topk", "modified_softmax", "gumbel", "adaptive_threshold", "grkan",
                            "task_aware"}
    for name, cls in ROUTERS.items():
        extra = {"num_tasks": 3} if name == "task_aware" else {}
        router = make_router(name, D, E, **extra)
        assert type(router) is cls
        assert router.num_experts == E and router.dim == D and 1 <= router.k <= E
        assert cls.__doc__ and any(str(year) in cls.__doc__ for year in range(1990, 2026))  # names its paper
        x = torch.randn(7, D)
        r = router(x, task_ids=1 if extra else None)
        assert r.weights.dtype == torch.float32 and r.weights.shape == (7, router.k)
        assert r.indices.dtype == torch.int64 and r.indices.shape == (7, router.k)
        assert r.probs.shape == (7, E) and torch.allclose(r.probs.sum(-1), torch.ones(7))
        assert r.logits is None or r.logits.shape == (7, E)
        assert isinstance(r.aux, dict)
        r.weights.sum().backward()


def test_topk_with_k_equal_e_is_the_dense_softmax_router():
    soft = SoftmaxRouter(D, E)
    top = TopKRouter(D, E, k=E)
    top.load_state_dict(soft.state_dict())
    assert soft.dense and top.dense and not TopKRouter(D, E, k=2).dense
    x = torch.randn(9, D)
    rs, rt = soft(x), top(x)
    want = torch.softmax(x @ soft.gate.weight.T, -1)
    assert_close("softmax router", want, dense(rs), 1e-6)
    assert_close("top-E router", dense(rs), dense(rt), 1e-7)
    assert_close("probs", rs.probs, rt.probs, 1e-7)


def test_topk_selects_the_k_largest_and_renormalises():
    router = TopKRouter(D, E, k=2)
    x = torch.randn(11, D)
    r = router(x)
    logits = x @ router.gate.weight.T
    top = logits.topk(2, -1)
    assert torch.equal(r.indices, top.indices)
    assert_close("weights", torch.softmax(top.values, -1), r.weights, 1e-6)
    assert_close("probs (full softmax)", torch.softmax(logits, -1), r.probs, 1e-6)
    assert_close("logits", logits, r.logits, 1e-6)


def test_noisy_topk_is_noisy_only_in_training_and_trains_w_noise():
    router = TopKRouter(D, E, k=1, noisy=True)
    x = torch.randn(64, D)
    clean = TopKRouter(D, E, k=1)
    clean.gate.load_state_dict(router.gate.state_dict())
    router.eval()
    assert torch.equal(router(x).indices, clean(x).indices)
    router.train()
    a, b = router(x), router(x)
    assert not torch.equal(a.indices, b.indices)  # fresh noise every call
    (a.probs * torch.arange(E)).sum().backward()
    assert router.noise.weight.grad is not None and router.noise.weight.grad.abs().sum() > 0


def test_noisy_topk_matches_the_formula_in_training_and_is_clean_in_eval():
    """Training: weights = softmax over the k selected entries of the noisy logits
    l + eps * softplus(W_noise x), eps ~ N(0, 1) from the global RNG; eval: no noise."""
    router = TopKRouter(D, E, k=2, noisy=True)
    assert (router.gate.weight == 0).all() and (router.noise.weight == 0).all()  # Shazeer et al.'s init
    with torch.no_grad():
        router.gate.weight.normal_()  # not the zero init: distinct logits to select from in eval
        router.noise.weight.normal_()  # so that softplus(W_noise x) varies
    x = torch.randn(12, D)
    router.train()
    torch.manual_seed(7)
    r = router(x)
    torch.manual_seed(7)
    eps = torch.randn(12, E)  # the draw of the router's randn_like
    wg = router.gate.weight.detach().clone().requires_grad_()
    wn = router.noise.weight.detach().clone().requires_grad_()
    logits = x @ wg.T
    noisy = logits + eps * torch.nn.functional.softplus(x @ wn.T)
    top = noisy.topk(2, -1)
    want = torch.softmax(top.values, -1)
    assert torch.equal(r.indices, top.indices)
    assert_close("noisy weights", want, r.weights, 1e-6)
    assert_close("probs: softmax of the noisy logits", torch.softmax(noisy, -1), r.probs, 1e-6)
    assert_close("logits: the clean ones", logits, r.logits, 1e-6)
    g = torch.randn(12, 2)
    (r.weights * g).sum().backward()
    (want * g).sum().backward()
    assert_close("grad W_g", wg.grad, router.gate.weight.grad, 1e-5)
    assert_close("grad W_noise", wn.grad, router.noise.weight.grad, 1e-5)

    router.eval()
    re = router(x)
    clean = x @ router.gate.weight.T
    top = clean.topk(2, -1)
    assert torch.equal(re.indices, top.indices)
    assert_close("eval weights", torch.softmax(top.values, -1), re.weights, 1e-6)
    assert_close("eval probs", torch.softmax(clean, -1), re.probs, 1e-6)


def test_zero_init_is_shazeers_for_noisy_gates_and_an_option_otherwise():
    assert (TopKRouter(D, E, noisy=True).gate.weight == 0).all()
    assert (TopKRouter(D, E, zero_init=True).gate.weight == 0).all()
    assert TopKRouter(D, E).gate.weight.abs().sum() > 0
    assert TopKRouter(D, E, noisy=True, zero_init=False).gate.weight.abs().sum() > 0
    with pytest.raises(TypeError, match="zero_init"):
        TopKRouter(D, E, zero_init="yes")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_selection_bias_picks_but_does_not_weight(score):
    router = TopKRouter(D, E, k=2, selection_bias=True, bias_update_rate=0.1, score=score)
    assert "selection_bias" in router.state_dict()
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([-100.0, 0, 0, 100.0]))
    x = torch.randn(10, D)
    r = router(x)
    assert (r.indices[:, 0] == 3).all() and (r.indices != 0).all()
    logits = x @ router.gate.weight.T
    s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    chosen = s.gather(1, r.indices)
    assert_close("weights from the scores alone", chosen / chosen.sum(-1, keepdim=True), r.weights, 1e-6)
    assert_close("probs: the scores normalised", s / s.sum(-1, keepdim=True), r.probs, 1e-6)
    router.update_bias(torch.tensor([5, 1, 3, 3]))  # mean 3: expert 0 over-, expert 1 under-loaded
    assert_close("update", torch.tensor([-100.1, 0.1, 0.0, 100.0]), router.selection_bias, 1e-7)


def test_modified_softmax_transforms_the_input():
    router = ModifiedSoftmaxRouter(D, E)
    x = 3 * torch.randn(8, D)
    assert router.gate.bias is not None  # the paper's beta_0
    want = torch.softmax(torch.tanh(x) @ router.gate.weight.T + router.gate.bias, -1)
    assert router.dense
    assert_close("tanh", want, dense(router(x)), 1e-6)
    no_bias = ModifiedSoftmaxRouter(D, E, gate_bias=False)
    assert no_bias.gate.bias is None
    assert_close("no intercept", torch.softmax(torch.tanh(x) @ no_bias.gate.weight.T, -1), dense(no_bias(x)), 1e-6)
    custom = ModifiedSoftmaxRouter(D, E, k=2, transform=lambda t: t.clamp(-1, 1))
    assert not custom.dense
    r = custom(x)
    logits = x.clamp(-1, 1) @ custom.gate.weight.T + custom.gate.bias
    assert torch.equal(r.indices, logits.topk(2, -1).indices)
    for name in ("sigmoid", "softsign", "arctan"):
        out = ModifiedSoftmaxRouter(D, E, transform=name)(x)
        assert torch.isfinite(out.weights).all()
    with pytest.raises(ValueError, match="transform must be one of"):
        ModifiedSoftmaxRouter(D, E, transform="relu")
    with pytest.raises(TypeError, match="transform"):
        ModifiedSoftmaxRouter(D, E, transform=3)


def test_gumbel_tends_to_one_hot_as_tau_goes_to_zero():
    x = torch.randn(32, D)
    peak = {}
    for tau in (10.0, 1.0, 1e-3):
        router = GumbelSoftmaxRouter(D, E, tau=tau)
        torch.manual_seed(0)
        with torch.no_grad():
            router.gate.weight.copy_(torch.randn(E, D))
        router.train()
        w = dense(router(x))
        assert_close("rows sum to 1", torch.ones(32), w.sum(-1), 1e-6)
        peak[tau] = w.max(-1).values.min().item()
    assert peak[1e-3] > 0.999
    assert peak[10.0] < peak[1.0] < peak[1e-3]


def test_gumbel_eval_is_deterministic_and_hard_is_straight_through():
    router = GumbelSoftmaxRouter(D, E, tau=0.5, samples=5, seed=3)
    x = torch.randn(16, D)
    router.eval()
    torch.manual_seed(1)
    a = router(x)
    torch.manual_seed(2)
    b = router(x)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.indices, b.indices)
    assert_close("rows sum to 1", torch.ones(16), dense(a).sum(-1), 1e-6)
    other_seed = GumbelSoftmaxRouter(D, E, tau=0.5, samples=5, seed=4)
    other_seed.load_state_dict(router.state_dict())
    assert not torch.equal(other_seed.eval()(x).weights, a.weights)
    router.train()
    assert not torch.equal(dense(router(x)), dense(router(x)))  # fresh samples in training

    hard = GumbelSoftmaxRouter(D, E, tau=0.5, hard=True)
    hard.train()
    r = hard(x)
    w = dense(r)
    assert ((w == 0) | (w == 1)).all() and torch.equal(w.sum(-1), torch.ones(16))
    (w * torch.randn(16, E)).sum().backward()
    assert hard.gate.weight.grad.abs().sum() > 0  # the soft sample's gradient
    hard.eval()
    r = hard(x)
    assert r.keep is not None and torch.equal(r.keep.sum(-1), torch.ones(16, dtype=torch.int64))


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_eval_depends_on_the_token_alone(hard):
    """Eval: w = (1/S) sum_s softmax((l + G_s) / tau), the same S noise vectors G (S, E) for every
    token, drawn from torch.Generator().manual_seed(seed): the same output for a token alone or
    inside any batch, at any position."""
    seed, samples, tau = 11, 4, 0.7
    router = GumbelSoftmaxRouter(D, E, tau=tau, samples=samples, seed=seed, hard=hard).eval()
    x = torch.randn(9, D)
    gen = torch.Generator().manual_seed(seed)
    g = -torch.empty(samples, E).exponential_(generator=gen).log()
    logits = x @ router.gate.weight.T + router.gate.bias
    want = torch.softmax((logits[:, None, :] + g) / tau, -1).mean(1)  # (N, E)
    if hard:
        want = torch.nn.functional.one_hot(want.argmax(-1), E).float()
    with torch.no_grad():
        full = dense(router(x))
        assert_close("formula", want, full, 1e-6)
        for i in (0, 4, 8):
            alone = dense(router(x[i:i + 1]))
            others = torch.cat([torch.randn(5, D), x[i:i + 1], torch.randn(2, D)])
            inside = dense(router(others))[5:6]
            assert_close(f"token {i} alone", full[i:i + 1], alone, 1e-6)
            assert_close(f"token {i} in another batch", full[i:i + 1], inside, 1e-6)
    assert torch.equal(router.eval_noise(), g)


def test_gumbel_eval_noise_is_drawn_at_construction_and_again_for_a_new_seed():
    """torch.compile cannot create a Generator, so the noise is drawn when the router is built
    (a compiled first forward finds it); changing ``seed`` or ``samples`` later draws it anew."""
    router = GumbelSoftmaxRouter(D, E, seed=3, samples=4)
    draw = lambda seed, samples: -torch.empty(samples, E).exponential_(  # noqa: E731
        generator=torch.Generator().manual_seed(seed)).log()
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(router.eval_noise(), draw(3, 4))
    assert router.eval_noise(dtype=torch.float64).dtype == torch.float64
    router.seed, router.samples = 7, 2
    assert torch.equal(router.eval_noise(), draw(7, 2))


def test_gumbel_hard_is_one_hot_forward_with_the_soft_sample_gradient():
    router = GumbelSoftmaxRouter(D, E, tau=0.5, hard=True).train()
    x = torch.randn(10, D)
    torch.manual_seed(5)
    w = dense(router(x))
    torch.manual_seed(5)
    gumbel = -torch.empty(10, E).exponential_().log()  # the router's draw
    wg = router.gate.weight.detach().clone().requires_grad_()
    soft = torch.softmax((x @ wg.T + router.gate.bias.detach() + gumbel) / 0.5, -1)
    one_hot = torch.nn.functional.one_hot(soft.argmax(-1), E).float()
    assert_close("forward: one-hot of the sample's argmax", one_hot, w, 1e-6)
    g = torch.randn(10, E)
    (w * g).sum().backward()
    (soft * g).sum().backward()
    assert_close("backward: the soft sample's gradient", wg.grad, router.gate.weight.grad, 1e-5)


def test_adaptive_threshold_formula_and_edge_cases():
    router = AdaptiveThresholdRouter(D, E)
    assert router.tau_max == 1 / E and not router.dense
    x = torch.randn(20, D)
    r = router(x)
    p = torch.softmax(x @ router.gate.weight.T, -1)
    tau = torch.sigmoid(x @ router.threshold.weight.T + router.threshold.bias) / E
    excess = torch.relu(p - tau)
    want = excess / excess.sum(-1, keepdim=True)
    assert torch.equal(r.indices, torch.arange(E).repeat(20, 1))
    assert torch.equal(r.keep, excess > 0)
    assert_close("weights", want, r.weights, 1e-6)

    zero = AdaptiveThresholdRouter(D, E, tau_max=0.0)  # threshold 0: every expert, w = p
    r0 = zero(x)
    assert r0.keep.all()
    assert_close("w = p", torch.softmax(x @ zero.gate.weight.T, -1), r0.weights, 1e-6)

    none = AdaptiveThresholdRouter(D, E, tau_max=1.0)
    with torch.no_grad():
        none.threshold.weight.zero_()
        none.threshold.bias.fill_(40.0)  # tau = 1 > every p
    rn = none(x)
    assert not rn.keep.any() and (rn.weights == 0).all()
    with pytest.raises(ValueError, match="tau_max"):
        AdaptiveThresholdRouter(D, E, tau_max=-0.1)


def test_grkan_router_gives_unnormalised_sigmoid_gates():
    router = GRKANRouter(D, E, grid_size=3)
    x = torch.randn(10, D)
    r = router(x)
    assert router.dense and r.logits is None and r.keep is None
    assert ((r.weights > 0) & (r.weights < 1)).all()
    assert_close("gates", torch.sigmoid(router.grkan(x)), r.weights, 1e-6)
    assert not torch.allclose(r.weights.sum(-1), torch.ones(10))  # not renormalised
    assert_close("probs", r.weights / r.weights.sum(-1, keepdim=True), r.probs, 1e-6)
    r.weights.sum().backward()
    assert all(p.grad is not None for p in router.parameters())


def test_grkan_router_computes_in_float32_with_bf16_parameters():
    router = GRKANRouter(D, E, grid_size=3)
    router.to(torch.bfloat16)
    ref = copy.deepcopy(router).float()  # the same (bf16-rounded) parameters, in float32
    x = torch.randn(10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x.bfloat16())
    want = torch.sigmoid(ref.grkan(x.bfloat16().float()))
    assert r.weights.dtype == torch.float32 and r.probs.dtype == torch.float32
    assert_close("float32 gates", want, r.weights, 1e-6)
    r.weights.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in router.parameters())


@pytest.mark.parametrize("mode", ["embed", "per_task"])
def test_task_aware_routing_depends_on_the_task(mode):
    router = TaskAwareRouter(D, E, k=2, num_tasks=3, mode=mode)
    x = torch.randn(12, D)
    r0, r1 = router(x, task_ids=0), router(x, task_ids=torch.tensor(1))
    assert not torch.equal(r0.logits, r1.logits)
    per_token = torch.tensor([0, 1] * 6)
    rm = router(x, task_ids=per_token)
    assert_close("per token", torch.where(per_token[:, None] == 0, r0.logits, r1.logits), rm.logits, 1e-6)
    if mode == "embed":
        want = torch.cat([x, router.task_embed.weight[per_token]], -1) @ router.gate.weight.T
    else:
        want = torch.einsum("ned,nd->ne", router.gate_weight[per_token], x)
    assert_close("logits", want, rm.logits, 1e-6)
    with pytest.raises(ValueError, match="task_ids is required"):
        router(x)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        router(x, task_ids=3)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        router(x, task_ids=torch.tensor([-1] * 12))
    with pytest.raises(ValueError, match="task_ids must have shape"):
        router(x, task_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="task_ids must be an int"):
        router(x, task_ids=torch.zeros(12))
    with pytest.raises(ValueError, match="mode"):
        TaskAwareRouter(D, E, num_tasks=3, mode="lookup")
    with pytest.raises(TypeError, match="num_tasks"):
        make_router("task_aware", D, E)


def test_switch_balance_loss_on_a_hand_computed_case():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.1, 0.2]])
    # P = column means = (1.5, 1.2, 1.3) / 4 = (0.375, 0.3, 0.325)
    # k = 1, choices 0, 1, 2, 0: f = (2/4, 1/4, 1/4)
    # E * sum f P = 3 * (0.5 * 0.375 + 0.25 * 0.3 + 0.25 * 0.325) = 3 * 0.34375 = 1.03125
    top1 = torch.tensor([[0], [1], [2], [0]])
    assert switch_balance_loss(probs, top1, 3).item() == pytest.approx(1.03125, abs=1e-7)
    # f_i = count_i / N over the N = 4 TOKENS (not over the N * k assignments), so sum_i f_i = k.
    # k = 2: choices 0,1 | 1,2 | 2,0 | 0,2 -> counts (3, 2, 3), f = (3/4, 2/4, 3/4)
    # 3 * (0.75 * 0.375 + 0.5 * 0.3 + 0.75 * 0.325) = 3 * (0.28125 + 0.15 + 0.24375) = 3 * 0.675 = 2.025
    top2 = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    assert switch_balance_loss(probs, top2, 3).item() == pytest.approx(2.025, abs=1e-6)
    # token 1's second choice masked: kept choices 0,1 | 1 | 2,0 | 0,2 -> counts (3, 2, 2), f = (3/4, 2/4, 2/4)
    # 3 * (0.75 * 0.375 + 0.5 * 0.3 + 0.5 * 0.325) = 3 * (0.28125 + 0.15 + 0.1625) = 3 * 0.59375 = 1.78125
    keep = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    assert switch_balance_loss(probs, top2, 3, keep=keep).item() == pytest.approx(1.78125, abs=1e-6)
    # a uniform router with a uniform load gives exactly k: 1 for top-1, 2 for top-2
    uniform = torch.full((3, 3), 1 / 3)
    assert switch_balance_loss(uniform, torch.tensor([[0], [1], [2]]), 3).item() == pytest.approx(1.0)
    assert switch_balance_loss(uniform, torch.tensor([[0, 1], [1, 2], [2, 0]]), 3).item() == pytest.approx(2.0)
    # nothing kept: zero
    assert switch_balance_loss(probs, top2, 3, keep=torch.zeros(4, 2, dtype=torch.bool)).item() == 0.0
    # the gradient goes to the probabilities only: d/dP_i = E * f_i / N
    p = probs.clone().requires_grad_()
    switch_balance_loss(p, top1, 3).backward()
    assert_close("grad", torch.tensor([0.5, 0.25, 0.25]).expand(4, 3) * 3 / 4, p.grad, 1e-7)
    assert switch_balance_loss(probs[:0], top1[:0], 3).item() == 0.0


def test_router_z_loss_on_a_hand_computed_case():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 = 2 log 2 -> mean of squares (1 + 4) / 2 * log(2)^2
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"router must be one of \['adaptive_threshold', 'grkan', 'gumbel'"):
        make_router("switch", D, E)
    with pytest.raises(TypeError, match="router must be a name"):
        make_router(TopKRouter, D, E)
    with pytest.raises(ValueError, match=r"k must be <= num_experts \(4\)"):
        make_router("topk", D, E, k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        make_router("topk", D, E, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        make_router("topk", D, E, k=1.5)
    with pytest.raises(ValueError, match="k: SoftmaxRouter is dense"):
        make_router("softmax", D, E, k=2)
    with pytest.raises(ValueError, match="k: GumbelSoftmaxRouter is dense"):
        make_router("gumbel", D, E, k=1)
    for tau in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            make_router("gumbel", D, E, tau=tau)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        make_router("gumbel", D, E, samples=0)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        make_router("topk", D, 0)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        make_router("topk", 0, E)
    with pytest.raises(ValueError, match="bias_update_rate"):
        make_router("topk", D, E, bias_update_rate=0.0)
    router = make_router("topk", D, E)
    with pytest.raises(ValueError, match=r"x must have shape \(tokens, 6\)"):
        router(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match=r"x must have shape \(tokens, 6\)"):
        router(torch.randn(2, 3, D))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        router(torch.ones(3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="probs must have shape"):
        switch_balance_loss(torch.rand(3, 2), torch.zeros(3, 1, dtype=torch.long), 3)
