"""Task-level routing (``TaskAwareRouter(mode="task")``) and the extraction of a task's
sub-network (Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts for
Efficient Inference"; docs/routing.md, "Task-level routing and sub-network extraction")."""

import pytest
import torch
from torch import nn

from gatezoo.blocks import (
    MoEFeedForward,
    MoLELinear,
    PreGatedMoEStack,
    TaskAwareRouter,
    TaskExpertsFeedForward,
    extract_task_experts,
    make_router,
    moe_layers,
    set_task_ids,
)
from gatezoo.models import create_model, extract_task_model

F64 = torch.float64
D, E, K, T = 8, 4, 2, 3
TASK = {"num_tasks": T, "mode": "task"}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _distinct_tasks(router: TaskAwareRouter) -> None:
    """Give the T tasks different expert sets (a fresh init may pick the same ones by chance)."""
    with torch.no_grad():
        logits = torch.full((T, E), -1.0)
        for t in range(T):
            logits[t, [t % E, (t + 1) % E]] = torch.tensor([1.0, 0.5]) * (t + 1)
        # W_g e_t = logits_t: e_t = the first E unit vectors, W_g their logits
        router.task_embed.weight.zero_()
        router.task_embed.weight[:, :T] = torch.eye(T)
        router.gate.weight.zero_()
        router.gate.weight[:, :T] = logits.T
        router.gate.weight[:, T:] = torch.randn(E, router.task_dim - T) * 0.1


# --- the router -------------------------------------------------------------------------------


def test_task_level_router_routes_every_token_of_a_task_alike_whatever_its_input():
    torch.manual_seed(0)
    router = make_router("task_aware", D, E, k=K, **TASK)
    _distinct_tasks(router)
    tasks = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0])
    r = router(torch.randn(8, D), task_ids=tasks)
    r_other = router(torch.randn(8, D) * 10, task_ids=tasks)  # the input plays no part
    assert torch.equal(r.indices, r_other.indices) and torch.equal(r.weights, r_other.weights)
    want_logits = router.task_embed.weight @ router.gate.weight.T  # l_t = W_g e_t
    assert torch.allclose(r.logits, want_logits[tasks], atol=1e-6)
    assert torch.allclose(r.probs, torch.softmax(want_logits, -1)[tasks], atol=1e-6)
    for t in range(T):
        top = want_logits[t].topk(K)
        rows = (tasks == t).nonzero().flatten()
        assert torch.equal(r.indices[rows], top.indices.expand(len(rows), K))
        assert torch.allclose(r.weights[rows], torch.softmax(top.values, -1).expand(len(rows), K), atol=1e-6)
        idx, w = router.task_routing(t)
        assert torch.equal(idx, top.indices) and torch.equal(w, r.weights[rows[0]])
    assert len({tuple(router.task_routing(t)[0].tolist()) for t in range(T)}) == T
    # the weights train the task embeddings and the gate
    r.weights.square().sum().backward()
    assert router.gate.weight.grad.norm() > 0 and router.task_embed.weight.grad.norm() > 0


def test_task_level_router_options_and_bad_arguments():
    router = TaskAwareRouter(D, E, k=K, num_tasks=T, mode="task", task_dim=5)
    assert router.task_level and router.task_embed.weight.shape == (T, 5) and router.gate.weight.shape == (E, 5)
    assert router.task_logits(F64).dtype == F64
    assert router(torch.randn(3, D, dtype=F64), task_ids=1).logits.dtype == F64
    assert router(torch.randn(0, D), task_ids=0).weights.shape == (0, K)
    assert "mode='task'" in repr(router)
    with pytest.raises(ValueError, match="task_ids is required"):
        router(torch.randn(3, D))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        router(torch.randn(3, D), task_ids=3)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"task must lie in \[0, 3\)"):
            router.task_routing(bad)
    for bad in (1.0, True, "0", torch.tensor([0, 1]), torch.tensor(1.0)):
        with pytest.raises(TypeError, match="task must be an int"):
            router.task_routing(bad)
    assert torch.equal(router.task_routing(torch.tensor(2))[0], router.task_routing(2)[0])
    with pytest.raises(ValueError, match="dtype"):
        router.task_logits(torch.float16)
    with pytest.raises(ValueError, match="needs mode='task'"):
        TaskAwareRouter(D, E, num_tasks=T, mode="embed").task_logits()
    with pytest.raises(TypeError, match="mode must be one of"):
        TaskAwareRouter(D, E, num_tasks=T, mode=1)
    with pytest.raises(ValueError, match="task_dim is only used"):
        TaskAwareRouter(D, E, num_tasks=T, mode="per_task", task_dim=4)


def test_task_level_auxiliary_losses_are_token_weighted_over_the_tasks():
    """f_i = share of tokens whose task selects expert i, P_i = token-weighted mean of
    softmax(l_t)_i, z = token-weighted mean of logsumexp(l_t)^2."""
    torch.manual_seed(1)
    layer = MoEFeedForward(D, 8, num_experts=E, k=K, router="task_aware", router_args=dict(TASK),
                           balance_coef=0.1, z_loss_coef=0.01).double()
    _distinct_tasks(layer.router)
    tasks = torch.tensor([0, 0, 0, 1, 2, 2])  # shares 1/2, 1/6, 1/3
    layer(torch.randn(6, D, dtype=F64), task_ids=tasks)
    share = torch.bincount(tasks, minlength=T).to(F64) / len(tasks)
    logits = layer.router.task_logits(F64).detach()
    f = torch.zeros(E, dtype=F64)
    for t in range(T):
        f[layer.router.task_routing(t, F64)[0]] += share[t]
    p = share @ torch.softmax(logits, -1)
    assert torch.allclose(layer.last_aux["balance"], 0.1 * E * (f * p).sum(), rtol=1e-12)
    assert torch.allclose(layer.last_aux["z"], 0.01 * (share * torch.logsumexp(logits, -1) ** 2).sum(), rtol=1e-12)
    layer.aux_loss.backward()
    assert layer.router.gate.weight.grad.norm() > 0 and layer.router.task_embed.weight.grad.norm() > 0


# --- one layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, tol", [
    ({"expert": "swiglu"}, 1e-12),
    ({"expert": "mlp-xgelu", "bias": True}, 1e-12),
    # a hidden norm takes the layer off the fused expert_ffn path, and unpermute sums the k
    # weighted expert outputs in float32 (also for float64 inputs): float32 closeness there
    ({"expert": "mlp-relu", "norm_layer": nn.LayerNorm}, 1e-6),
], ids=["swiglu", "mlp-xgelu+bias", "mlp-relu+norm"])
def test_extracted_experts_compute_the_layer_on_their_task(variant, tol):
    torch.manual_seed(2)
    layer = MoEFeedForward(D, 8, num_experts=E, k=K, router="task_aware", router_args=dict(TASK),
                           **variant).double().eval()
    _distinct_tasks(layer.router)
    if layer.alpha is not None:
        with torch.no_grad():
            layer.alpha.fill_(0.3)
    x = torch.randn(2, 5, D, dtype=F64)
    expert_params = sum(p.numel() for p in (layer.w1, layer.w2, layer.b1, layer.b2) if p is not None)
    for t in range(T):
        sub = extract_task_experts(layer, t)
        assert isinstance(sub, TaskExpertsFeedForward) and sub.task == t
        assert list(sub.experts) == layer.router.task_routing(t)[0].tolist()
        assert torch.allclose(sub(x), layer(x, task_ids=t), rtol=tol, atol=tol)
        assert torch.allclose(sub(x, task_ids=t), sub(x), rtol=0, atol=0)
        # only k of the E experts, no router
        assert _count(layer) - _count(sub) == expert_params * (E - K) // E + _count(layer.router)
        with pytest.raises(ValueError, match=f"extracted for task {t} alone"):
            sub(x, task_ids=(t + 1) % T)
        with pytest.raises(ValueError, match=f"extracted for task {t} alone"):
            sub(x, task_ids=torch.tensor([t, (t + 1) % T]))
    with pytest.raises(TypeError, match="task_ids must be None, an int"):
        sub(x, task_ids=1.0)
    with pytest.raises(ValueError, match=f"x must have {D} features"):
        sub(torch.randn(3, D + 1, dtype=F64))


def test_extracted_experts_are_a_detached_copy():
    layer = MoEFeedForward(D, 8, num_experts=E, k=K, router="task_aware", router_args=dict(TASK))
    sub = extract_task_experts(layer, 0)
    before = layer.w1.detach().clone()
    with torch.no_grad():
        sub.w1.add_(1.0)
    assert torch.equal(layer.w1, before)
    assert set(dict(sub.named_buffers())) == {"combine_weights"}
    assert sub.combine_weights.dtype == torch.float32


def test_extracted_mole_linear_is_the_merged_linear_of_its_task():
    torch.manual_seed(3)
    layer = MoLELinear(D, 6, num_experts=E, rank=2, router="task_aware", router_args={**TASK, "k": K}).double()
    _distinct_tasks(layer.router)
    with torch.no_grad():
        layer.lora_b.normal_()  # LoRA's B starts at 0: give the experts something to add
    x = torch.randn(7, D, dtype=F64)
    for t in range(T):
        sub = extract_task_experts(layer, t)
        assert type(sub) is nn.Linear and sub.weight.dtype == F64
        idx, w = layer.router.task_routing(t, F64)
        want = layer.base(x) + layer.scaling * sum(
            w[j].double() * (x @ layer.lora_a[e] @ layer.lora_b[e]) for j, e in enumerate(idx.tolist()))
        assert torch.allclose(sub(x), want, rtol=1e-12, atol=1e-12)
        # the layer's unpermute sums the experts' weighted outputs in float32, float64 inputs too
        assert torch.allclose(sub(x), layer(x, task_ids=t), rtol=1e-6, atol=1e-6)
        assert _count(sub) == _count(layer.base) < _count(layer)


@pytest.mark.parametrize("router, args, what", [
    ("topk", {}, "TopKRouter"),
    ("task_aware", {"num_tasks": T, "mode": "embed"}, "mode='embed'"),
    ("task_aware", {"num_tasks": T, "mode": "per_task"}, "mode='per_task'"),
])
def test_a_token_level_layer_is_refused(router, args, what):
    layer = MoEFeedForward(D, 8, num_experts=E, k=K, router=router, router_args=args)
    with pytest.raises(ValueError, match=f"{what}.*depends on the tokens"):
        extract_task_experts(layer, 0)
    mole = MoLELinear(D, 6, num_experts=E, rank=2)  # AdaMoLE's adaptive threshold
    with pytest.raises(ValueError, match="AdaptiveThresholdRouter.*depends on the tokens"):
        extract_task_experts(mole, 0)


def test_extract_task_experts_bad_arguments():
    layer = MoEFeedForward(D, 8, num_experts=E, k=K, router="task_aware", router_args=dict(TASK))
    for bad in (T, -1):
        with pytest.raises(ValueError, match=r"task must lie in \[0, 3\)"):
            extract_task_experts(layer, bad)
    for bad in (0.0, False, None, "1"):
        with pytest.raises(TypeError, match="task must be an int"):
            extract_task_experts(layer, bad)
    with pytest.raises(TypeError, match="layer must be a MoEFeedForward or a MoLELinear, got Linear"):
        extract_task_experts(nn.Linear(D, D), 0)
    stack = PreGatedMoEStack([layer])
    with pytest.raises(TypeError, match="extract_task_model"):
        extract_task_experts(stack, 0)


# --- whole models -------------------------------------------------------------------------------


def _task_vit(mode: str = "task", depth: int = 2):
    torch.manual_seed(4)
    model = create_model("vit_tiny_moe", dim=16, depth=depth, img_size=8, patch_size=4, heads=2, num_experts=E,
                         router="task_aware", router_args={"num_tasks": T, "mode": mode})
    return model.double().eval(), torch.randn(3, 1, 8, 8, dtype=F64)


def test_extracted_vit_computes_the_full_vit_on_its_task_without_task_ids():
    model, x = _task_vit()
    for block in model.blocks:
        _distinct_tasks(block.ffn.router)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    ffn = model.blocks[0].ffn
    per_layer = sum(p.numel() for p in (ffn.w1, ffn.w2)) * (E - K) // E + _count(ffn.router)
    with pytest.raises(ValueError, match="task_ids is required"):
        model(x)  # the full model needs its task ids...
    for t in range(T):
        sub = extract_task_model(model, t)
        assert not moe_layers(sub)  # ...the sub-network has no router left
        set_task_ids(model, t)
        assert torch.allclose(sub(x), model(x), rtol=1e-12, atol=1e-12)
        assert _count(model) - _count(sub) == len(model.blocks) * per_layer
        assert sub.training == model.training
    # the model itself is left as it was
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
    assert len(moe_layers(model).stats()["layers"]) == len(model.blocks)


def test_extracted_pregated_stack_computes_the_stack():
    torch.manual_seed(5)
    layers = [MoEFeedForward(D, 8, num_experts=E, k=K, router="task_aware", router_args=dict(TASK)).double()
              for _ in range(2)]
    for layer in layers:
        _distinct_tasks(layer.router)
    stack = PreGatedMoEStack(layers, record_events=True)
    x = torch.randn(6, D, dtype=F64)
    for t in range(T):
        sub = extract_task_model(stack, t)
        assert isinstance(sub, PreGatedMoEStack)
        assert all(isinstance(layer, TaskExpertsFeedForward) for layer in sub.layers)
        assert torch.allclose(sub(x), stack(x, task_ids=t), rtol=1e-12, atol=1e-12)
        assert torch.allclose(sub(x, task_ids=t), sub(x), rtol=0, atol=0)
    # a bare MoE layer is a model too: its sub-network comes back
    assert isinstance(extract_task_model(layers[0], 1), TaskExpertsFeedForward)


def test_extract_task_model_refuses_token_level_layers_naming_them():
    model, _ = _task_vit(mode="embed", depth=1)
    with pytest.raises(ValueError, match=r"MoE layer 'blocks\.0\.ffn'.*mode='embed'.*depends on the tokens"):
        extract_task_model(model, 0)
    topk = create_model("vit_tiny_moe", dim=16, depth=1, img_size=8, patch_size=4, heads=2, num_experts=E)
    with pytest.raises(ValueError, match=r"MoE layer 'blocks\.0\.ffn'.*TopKRouter"):
        extract_task_model(topk, 0)


def test_extract_task_model_bad_arguments():
    model, _ = _task_vit(depth=1)
    with pytest.raises(ValueError, match=r"'blocks\.0\.ffn'.*task must lie in \[0, 3\)"):
        extract_task_model(model, T)
    with pytest.raises(TypeError, match="task must be an int"):
        extract_task_model(model, 1.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        extract_task_model("vit", 0)
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        extract_task_model(create_model("vit_tiny_rela", dim=16, depth=1, img_size=8, patch_size=4, heads=2), 0)
