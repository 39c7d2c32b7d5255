"""MoEFeedForward, MoLELinear, pre-gating, load statistics and auxiliary losses
(docs/architecture.md, 'The math', 'Routers and mixtures of experts'; docs/routing.md)."""

import copy
import functools
import pickle

import pytest
import torch
from closeness import assert_close
from torch import nn

from gatezoo.blocks import (
    MoEFeedForward,
    MoLELinear,
    PreGatedMoEStack,
    Router,
    RoutingResult,
    glu_hidden_features,
    link_pregated,
    moe_aux_loss,
    moe_stats,
    reset_moe_stats,
    set_task_ids,
    switch_balance_loss,
    unlink_pregated,
)
from gatezoo.kernels import KINDS
from gatezoo.kernels.activation.naive import phi_composed

F64 = torch.float64


class FixedRouter(Router):
    """Hands out fixed choices, for the capacity tests."""

    def __init__(self, dim, num_experts, indices, weights):
        super().__init__(dim, num_experts, indices.shape[1])
        self.idx, self.w = indices, weights

    def forward(self, x, task_ids=None):
        probs = torch.full((x.shape[0], self.num_experts), 1 / self.num_experts)
        return RoutingResult(self.w, self.idx, None, None, probs, {})


def dense_experts(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: (N, E, d_out), written with einsums."""
    h = torch.einsum("nd,edh->neh", x, moe.w1)
    if moe.b1 is not None:
        h = h + moe.b1
    spec = KINDS[moe.kind]
    if moe.is_glu:
        a, b = h.chunk(2, -1)
        h = phi_composed(a, spec, moe.alpha) * b
    else:
        h = phi_composed(h, spec, moe.alpha)
    out = torch.einsum("neh,eho->neo", h, moe.w2)
    return out + moe.b2 if moe.b2 is not None else out


def dense_weights(r: RoutingResult, num_experts: int) -> torch.Tensor:
    w = r.weights.to(F64)
    if r.keep is not None:
        w = torch.where(r.keep, w, 0)
    return torch.zeros(w.shape[0], num_experts, dtype=F64).scatter_add(1, r.indices, w)


def grads(module, x, out):
    torch.manual_seed(5)
    g = torch.randn_like(out)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for n, p in module.named_parameters() if p.requires_grad]
    return names, torch.autograd.grad(out, [x, *params], g, allow_unused=True)


@pytest.mark.parametrize("expert,bias", [("swiglu", False), ("mlp-gelu", True), ("xgeglu1", False)])
def test_sparse_topk_equals_dense_einsum_with_an_independent_float64_router(expert, bias):
    torch.manual_seed(0)
    moe = MoEFeedForward(10, 12, num_experts=5, k=2, expert=expert, bias=bias, backend="torch", dtype=F64)
    if moe.alpha is not None:
        with torch.no_grad():
            moe.alpha.fill_(0.3)
    moe.eval()
    x = torch.randn(3, 7, 10, dtype=F64, requires_grad=True)
    y = moe(x)
    # the reference: routing recomputed in float64 from W_g, every expert run densely
    xf = x.reshape(-1, 10)
    logits = xf @ moe.router.gate.weight.T
    top = logits.topk(2, -1)
    w = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, -1))
    ref = torch.einsum("ne,neo->no", w, dense_experts(moe, xf)).reshape(3, 7, 10)
    assert_close("forward", ref, y, 1e-6)
    names, got = grads(moe, x, y)
    _, want = grads(moe, x, ref)
    assert "router.gate.weight" in names
    for name, a, b in zip(["x", *names], got, want):
        assert_close(f"grad {name}", b, a, 1e-5)


@pytest.mark.parametrize("router,args", [
    ("softmax", {}), ("topk", {"k": 1}), ("modified_softmax", {"k": 3}), ("gumbel", {"tau": 0.7}),
    ("adaptive_threshold", {}), ("grkan", {"grid_size": 3}), ("task_aware", {"k": 2, "num_tasks": 2}),
])
def test_sparse_dispatch_equals_dense_mixture_for_every_router(router, args):
    """Dropless dispatch == sum_i w_i f_i(x) over all experts with the router's weights, forward and
    every gradient (the reference routes again, an independent graph; eval mode is deterministic)."""
    torch.manual_seed(1)
    args = dict(args)
    k = args.pop("k", None)
    moe = MoEFeedForward(8, 8, num_experts=4, k=k, router=router, router_args=args, backend="torch", dtype=F64)
    moe.eval()
    task = 1 if router == "task_aware" else None
    x = torch.randn(13, 8, dtype=F64, requires_grad=True)
    y = moe(x, task_ids=task)
    ref = torch.einsum("ne,neo->no", dense_weights(moe.router(x, task), 4), dense_experts(moe, x))
    assert_close("forward", ref, y, 1e-6)
    names, got = grads(moe, x, y)
    _, want = grads(moe, x, ref)
    for name, a, b in zip(["x", *names], got, want):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert_close(f"grad {name}", b, a, 1e-5)


def test_topk_with_k_equal_e_equals_the_softmax_router_layer():
    torch.manual_seed(2)
    soft = MoEFeedForward(8, 16, num_experts=3, router="softmax")
    top = MoEFeedForward(8, 16, num_experts=3, router="topk", k=3)
    top.load_state_dict(soft.state_dict())
    x = torch.randn(2, 5, 8)
    assert_close("k = E", soft(x), top(x), 1e-6)
    assert soft.aux_loss.item() == 0.0  # no balance loss for a dense router
    assert top.aux_loss.item() == 0.0  # nor for top-k with k = E


def test_hidden_default_keeps_active_parameters():
    assert MoEFeedForward(96, num_experts=8, k=2).hidden_features == glu_hidden_features(96) // 2 == 128
    assert MoEFeedForward(16, num_experts=4, k=2).hidden_features == 24  # 48 // 2 = 24
    assert MoEFeedForward(16, num_experts=4, k=3, expert="mlp-relu").hidden_features == 24  # ceil(64/3)=22 -> 24
    assert MoEFeedForward(16, num_experts=4, router="softmax", expert="mlp-gelu").hidden_features == 16
    m = MoEFeedForward(16, num_experts=4, k=2)
    assert m.w1.shape == (4, 16, 48) and m.w2.shape == (4, 24, 16) and m.k == 2
    assert MoEFeedForward(16, num_experts=4, expert="mlp-relu").w1.shape == (4, 16, 32)


def test_capacity_drops_exactly_the_documented_assignments():
    # E = 3, k = 2, N = 4, capacity_factor 0.75 -> capacity = ceil(0.75 * 4 * 2 / 3) = 2 rows per expert.
    # Ranked by choice slot, then token: expert 0 gets slot-0 tokens 0, 1, 3, then slot-1 token 2 ->
    # keeps (0,0), (1,0); drops (3,0) and (2,1). Expert 1: slot-0 token 2, slot-1 tokens 0, 3 -> drops (3,1).
    # Expert 2: slot-1 token 1. So token 3 loses both choices and token 2 its second.
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.55, 0.45], [0.8, 0.2]])
    moe = MoEFeedForward(6, 8, num_experts=3, router=FixedRouter(6, 3, idx, w), capacity_factor=0.75,
                         backend="torch")
    assert moe.capacity(4) == 2
    x = torch.randn(4, 6)
    y = moe(x)
    f = dense_experts(moe, x)  # (N, E, d)
    kept = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.float32)
    want = (w[..., None] * kept[..., None] * f.gather(1, idx[..., None].expand(-1, -1, 6))).sum(1)
    assert_close("capacity", want, y, 1e-6)
    assert (y[3] == 0).all()
    s = moe_stats(moe)["all"]
    assert s["dropped_share"] == pytest.approx(3 / 8) and s["zero_expert_share"] == pytest.approx(1 / 4)
    assert moe_stats(moe)["layers"]["MoEFeedForward"]["load_share"] == pytest.approx([4 / 8, 3 / 8, 1 / 8])

    # k = 1, everything to expert 0, capacity ceil(1.0 * 6 / 2) = 3: tokens 3, 4, 5 get nothing
    one = MoEFeedForward(6, 8, num_experts=2, router=FixedRouter(6, 2, torch.zeros(6, 1, dtype=torch.long),
                                                                  torch.ones(6, 1)), capacity_factor=1.0)
    x = torch.randn(6, 6)
    y = one(x)
    assert (y[3:] == 0).all()
    assert_close("first three", dense_experts(one, x)[:3, 0], y[:3], 1e-6)


def test_selection_bias_moves_load_to_under_loaded_experts():
    torch.manual_seed(3)
    moe = MoEFeedForward(8, 8, num_experts=4, k=1, router_args={"selection_bias": True, "bias_update_rate": 0.05})
    with torch.no_grad():
        moe.router.gate.weight.normal_(std=0.1)
        moe.router.gate.weight[0] += 0.15  # expert 0 is everyone's favourite
    x = torch.randn(128, 8).abs()
    moe.train()
    shares = []
    for _ in range(40):
        reset_moe_stats(moe)
        moe(x)
        shares.append(moe_stats(moe)["all"]["load_cv"])
    bias = moe.router.selection_bias
    assert bias[0] < 0 and (bias[1:] > 0).any()
    assert shares[-1] < 0.5 * shares[0]
    moe.eval()  # eval forwards leave the bias alone
    before = bias.clone()
    moe(x)
    assert torch.equal(moe.router.selection_bias, before)


def test_aux_loss_stats_and_helpers():
    model = nn.Sequential(MoEFeedForward(8, 8, num_experts=4, k=2, z_loss_coef=1e-3), nn.GELU(),
                          MoEFeedForward(8, 8, num_experts=4, router="softmax"))
    assert moe_aux_loss(model) is None and moe_aux_loss(nn.Linear(2, 2)) is None
    x = torch.randn(2, 6, 8)
    model.train()
    model(x)
    first = model[0]
    r = first.last_routing
    want = 0.01 * switch_balance_loss(r.probs, r.indices, 4) + 1e-3 * torch.logsumexp(r.logits, -1).square().mean()
    assert_close("aux", want, first.aux_loss, 1e-6)
    assert set(first.last_aux) == {"balance", "z"}
    assert model[2].aux_loss.item() == 0.0 and model[2].last_aux == {}
    assert_close("sum", first.aux_loss + model[2].aux_loss, moe_aux_loss(model), 1e-7)
    moe_aux_loss(model).backward()
    assert first.router.gate.weight.grad.abs().sum() > 0

    stats = moe_stats(model)
    assert set(stats["layers"]) == {"0", "2"}
    layer = stats["layers"]["0"]
    assert layer["tokens"] == 12 and layer["assignments"] == 24 and sum(layer["load_share"]) == pytest.approx(1)
    assert stats["layers"]["2"]["load_cv"] == 0.0 and stats["layers"]["2"]["min_share"] == 0.25
    assert stats["all"]["tokens"] == 24 and stats["all"]["layers"] == 2
    assert not any(k.startswith("stat_") for k in model.state_dict())
    model.eval()
    model(x)  # eval forwards are not counted
    assert moe_stats(model)["all"]["tokens"] == 24
    reset_moe_stats(model)
    assert moe_stats(model)["all"]["tokens"] == 0


def test_deepcopy_and_pickle_after_a_training_step():
    torch.manual_seed(8)
    stack = PreGatedMoEStack([MoEFeedForward(8, 8, num_experts=4, k=2, z_loss_coef=1e-3) for _ in range(2)])
    model = nn.Sequential(MoEFeedForward(8, 8, num_experts=4, router="gumbel"), stack,
                          MoLELinear(8, 8, num_experts=3, rank=2))
    x = torch.randn(2, 5, 8)
    model.train()
    out = model(x)
    (out.square().mean() + moe_aux_loss(model)).backward()
    stack.layers[0](x)  # leaves a pre-gated routing (with its graph) pending in layer 1
    first = stack.layers[0]
    assert first.aux_loss.grad_fn is not None and stack.layers[1]._pending is not None
    assert set(first.last_aux) == {"balance", "z"}
    for name, value in first.last_aux.items():
        assert not value.requires_grad, name
    assert all(not t.requires_grad for t in stack.layers[0].last_routing[:5] if t is not None)

    copied = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    for other in (copied, loaded):
        assert all(m.aux_loss is None for m in (other[0], other[1].layers[0], other[1].layers[1], other[2]))
        assert other[1].layers[1]._pending is None
        assert other[1].layers[0]._pregate_next is other[1].layers[1]  # the copy's own link
        for a, b in zip(model.state_dict().values(), other.state_dict().values()):
            assert torch.equal(a, b)
    stack.layers[1]._pending = None  # drop the pending routing of the original too
    model.eval()
    want = model(x)
    for other in (copied, loaded):
        other.eval()
        assert_close("copy", want, other(x), 1e-6)
        other.train()
        y = other(x)
        (y.square().mean() + moe_aux_loss(other)).backward()


def test_pregated_stack_routes_one_layer_ahead():
    torch.manual_seed(4)
    layers = [MoEFeedForward(8, 8, num_experts=4, k=2) for _ in range(3)]
    stack = PreGatedMoEStack(layers, record_events=True)
    x = torch.randn(2, 5, 8)
    y = stack(x)
    assert stack.events == [("route", 0), ("route", 1), ("experts", 0), ("route", 2), ("experts", 1),
                            ("experts", 2)]
    # layer 1 was routed on layer 0's input, not its own
    assert torch.equal(layers[1].last_routing.indices, layers[1].router(x.reshape(-1, 8)).indices)
    # same output as running the layers by hand with that routing
    unlink_pregated(layers)
    h, route_input = x, x
    for layer in layers:
        layer._pending = layer.router(route_input.reshape(-1, 8))  # hand the routing over by hand
        route_input = h  # the next layer routes on this layer's input
        h = h + layer(h)
    want = h
    assert_close("pre-gated", want, y, 1e-6)
    y.sum().backward()
    assert all(layer.router.gate.weight.grad is not None for layer in layers)

    events = link_pregated(layers, record_events=True)
    layers[0](x)
    assert events == [("route", 0), ("route", 1), ("experts", 0)]
    with pytest.raises(RuntimeError, match="pre-gated routing"):
        layers[1](x[:1])
    with pytest.raises(TypeError, match=r"layers\[1\] must be a MoEFeedForward"):
        link_pregated([layers[0], nn.Linear(8, 8)])
    with pytest.raises(ValueError, match="pre-gating needs equal widths"):
        link_pregated([MoEFeedForward(8, 8, out_features=4), MoEFeedForward(4, 8)])


def test_task_ids_pass_through_per_token_or_per_row():
    moe = MoEFeedForward(8, 8, num_experts=4, router="task_aware", router_args={"num_tasks": 3})
    x = torch.randn(2, 5, 8)
    rows = torch.tensor([0, 2])
    a = moe(x, task_ids=rows)
    b = moe(x, task_ids=rows[:, None].expand(2, 5))
    assert_close("per row", b, a, 1e-7)
    assert not torch.allclose(moe(x, task_ids=0), moe(x, task_ids=2))
    set_task_ids(moe, rows)
    assert_close("default ids", a, moe(x), 1e-7)
    set_task_ids(moe, None)
    with pytest.raises(ValueError, match="task_ids is required"):
        moe(x)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        moe(x, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="task_ids must have shape"):
        moe(x, task_ids=torch.tensor([0, 1, 2]))


def test_mole_threshold_zero_uses_every_expert_weighted_by_p():
    torch.manual_seed(6)
    mole = MoLELinear(6, 5, num_experts=3, rank=2, alpha=4, router_args={"tau_max": 0.0}, backend="torch",
                      dtype=F64)
    with torch.no_grad():
        mole.lora_b.normal_()
    x = torch.randn(4, 3, 6, dtype=F64, requires_grad=True)
    y = mole(x)
    p = torch.softmax(x @ mole.router.gate.weight.T, -1)  # (4, 3, E)
    delta = torch.einsum("bte,btei->bti", p, torch.einsum("btd,edr,eri->btei", x, mole.lora_a, mole.lora_b))
    want = mole.base(x) + 2.0 * delta
    assert_close("tau = 0", want, y, 1e-6)
    names, got = grads(mole, x, y)
    _, ref = grads(mole, x, want)
    for name, a, b in zip(["x", *names], got, ref):
        if b is None:  # the threshold: tau = 0 * sigmoid(...) has zero gradient
            assert not a.any(), name
        else:
            assert_close(f"grad {name}", b, a, 1e-5)


def test_mole_without_active_expert_is_the_base_layer():
    mole = MoLELinear(6, 5, num_experts=3, router_args={"tau_max": 1.0})
    with torch.no_grad():
        mole.lora_b.normal_()
        mole.router.threshold.weight.zero_()
        mole.router.threshold.bias.fill_(40.0)  # tau ~ 1 > every p
    x = torch.randn(7, 6)
    mole.train()
    y = mole(x)
    assert torch.equal(y, mole.base(x))
    assert moe_stats(mole)["all"]["zero_expert_share"] == 1.0
    y.sum().backward()
    assert mole.base.weight.grad is not None


def test_mole_starts_as_its_base_and_wraps_a_linear():
    linear = nn.Linear(6, 4)
    mole = MoLELinear.from_linear(linear, num_experts=2, rank=3, freeze_base=True, router="topk",
                                  router_args={"k": 1})
    assert mole.base is linear and not linear.weight.requires_grad
    x = torch.randn(2, 3, 6)
    y = mole(x)
    assert y.shape == (2, 3, 4)
    assert_close("B = 0", linear(x), y, 1e-7)
    y.square().sum().backward()
    assert mole.lora_b.grad.abs().sum() > 0 and linear.weight.grad is None
    assert "stat_load" not in mole.state_dict()
    with pytest.raises(ValueError, match="rank must be >= 1"):
        MoLELinear(4, 4, rank=0)


def test_timm_vision_transformer_with_moe_mlp_layer():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    model = timm_vit.VisionTransformer(
        img_size=16, patch_size=8, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2, mlp_ratio=1.0,
        mlp_layer=functools.partial(MoEFeedForward, num_experts=4, k=2, backend="torch"))
    model.train()
    logits = model(torch.randn(2, 1, 16, 16))
    assert logits.shape == (2, 3)
    aux = moe_aux_loss(model)
    assert aux is not None and aux.item() > 0
    (logits.logsumexp(-1).sum() + aux).backward()
    assert model.blocks[0].mlp.router.gate.weight.grad is not None
    assert moe_stats(model)["all"]["layers"] == 2


def test_autocast_runs_the_experts_in_half_precision():
    moe = MoEFeedForward(8, 8, num_experts=4, k=2)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    assert_close("bf16", moe(x), y.float(), 2e-2)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="expert must be a GLU name"):
        MoEFeedForward(8, expert="mlp-swish")
    with pytest.raises(ValueError, match=r"router must be one of \["):
        MoEFeedForward(8, router="hash")
    with pytest.raises(ValueError, match=r"k must be <= num_experts \(4\)"):
        MoEFeedForward(8, num_experts=4, k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        MoEFeedForward(8, num_experts=4, k=0)
    with pytest.raises(ValueError, match="k: SoftmaxRouter is dense"):
        MoEFeedForward(8, num_experts=4, k=2, router="softmax")
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        MoEFeedForward(8, router="gumbel", router_args={"tau": 0.0})
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEFeedForward(8, capacity_factor=0)
    with pytest.raises(ValueError, match="balance_coef"):
        MoEFeedForward(8, balance_coef=-1.0)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        MoEFeedForward(8, num_experts=0)
    with pytest.raises(ValueError, match="router must route 8-wide tokens"):
        MoEFeedForward(8, num_experts=4, router=FixedRouter(6, 4, torch.zeros(1, 1, dtype=torch.long),
                                                            torch.ones(1, 1)))
    with pytest.raises(ValueError, match="x must have 8 features"):
        MoEFeedForward(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="x must have 6 features"):
        MoLELinear(6, 4)(torch.randn(2, 7))


def test_moe_stats_weight_share_is_each_experts_share_of_the_routing_weight():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 6, num_experts=4, router="softmax", backend="torch").train()
    x = torch.randn(5, 7, 8)
    moe(x)
    r = moe.last_routing
    expected = torch.zeros(4, dtype=torch.float64)
    expected.scatter_add_(0, r.indices.reshape(-1), r.weights.double().reshape(-1))
    layer = moe_stats(moe)["layers"]["MoEFeedForward"]
    torch.testing.assert_close(torch.tensor(layer["weight_share"], dtype=torch.float64), expected / expected.sum())
    assert layer["min_weight_share"] == pytest.approx(float((expected / expected.sum()).min()))
    assert layer["min_share"] == 0.25  # a dense router: every expert takes every token
    reset_moe_stats(moe)
    assert moe_stats(moe)["layers"]["MoEFeedForward"]["weight_share"] == [0.0] * 4
