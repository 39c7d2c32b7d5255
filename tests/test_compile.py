"""torch.compile: every registry model and every router traces with no graph break, and the
compiled model computes what the eager one does (docs/export.md).

The traces use ``torch._dynamo.explain`` (Dynamo only, nothing compiled) and ``torch.compile``
with the ``aot_eager`` backend (the forward and backward graphs of AOTAutograd, run by eager
PyTorch), so no inductor C++ build slows the suite down; inductor compiles the same graphs.
The models are tiny: width 16, one layer, 8x8 images or sentences of a few tokens.

Under a trace the routing ops take their static-shape form (gatezoo/kernels/routing/naive.py);
the last tests compare that form with the eager one op by op, with ``is_compiling`` patched.
"""

import copy

import pytest
import torch
import torch._dynamo
from closeness import TOL, assert_close

from gatezoo.blocks import ROUTERS, MoEFeedForward, MoLELinear, moe_aux_loss, set_task_ids
from gatezoo.kernels import KINDS
from gatezoo.kernels.routing import expert_ffn, grouped_mm, make_plan, permute, route, unpermute
from gatezoo.models import create_model, list_models

F64 = torch.float64
ROUTER_ARGS = {"task_aware": {"num_tasks": 3}}


def _tiny(name: str, **over):
    """A tiny instance of registry model ``name`` and a batch for it."""
    if name.startswith("transformer_mt"):
        model = create_model(name, vocab_size=40, dim=16, enc_layers=1, dec_layers=1, heads=2, ffn_hidden=32,
                             max_len=12, **over)
        return model, (torch.randint(4, 40, (2, 5)), torch.randint(4, 40, (2, 4)))
    if name.startswith("tabular"):
        model = create_model(name, num_features=5, num_outputs=3, width=8, bins=4, emb_dim=2, **over)
        return model, (torch.randn(2, 5),)
    if name.startswith("cnn"):
        return create_model(name, width=4, depths=[1, 1], img_size=8, **over), (torch.randn(2, 1, 8, 8),)
    args = {"dim": 16, "depth": 1, "img_size": 8, "patch_size": 4, **over}
    if name.startswith("vit"):
        args.setdefault("heads", 2)
    return create_model(name, **args), (torch.randn(2, 1, 8, 8),)


def _moe_vit(router: str, **over):
    model, inputs = _tiny("vit_tiny_moe", num_experts=4, router=router, router_args=ROUTER_ARGS.get(router, {}),
                          **over)
    if router == "task_aware":  # a ViT takes task ids this way (its forward has no argument for them)
        set_task_ids(model, torch.tensor([0, 2]))
    return model, inputs


def _graph_breaks(model, inputs) -> list:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*inputs)
    assert explained.graph_count >= 1
    return [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_traces_without_graph_breaks(name, train):
    model, inputs = _tiny(name)
    model.train(train)
    assert _graph_breaks(model, inputs) == []


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_inside_a_moe_layer_traces_without_graph_breaks(router, train):
    model, inputs = _moe_vit(router)
    model.train(train)
    assert _graph_breaks(model, inputs) == []


@pytest.mark.parametrize("over", [
    {"router_args": {"noisy": True, "selection_bias": True}},
    {"router": "gumbel", "router_args": {"hard": True}},
    {"capacity_factor": 0.5, "moe_expert": "mlp-xgelu"},
    {"pregated": True, "depth": 2},
], ids=["noisy+selection_bias", "gumbel-hard", "capacity+mlp", "pregated"])
def test_moe_options_trace_without_graph_breaks(over):
    model, inputs = _tiny("vit_tiny_moe", num_experts=4, **over)
    for train in (True, False):
        model.train(train)
        assert _graph_breaks(model, inputs) == [], train


def _compiled_vs_eager(model, inputs):
    """Forward, auxiliary loss, backward and the load counters of one training step, compiled
    (fullgraph, aot_eager) against an eager copy; then one eval forward. Float64 throughout."""
    model = model.double()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for m in (model, eager):
        m.train()
    y, ref = compiled(*inputs), eager(*inputs)
    assert_close("output", ref, y, TOL[F64])
    aux, aux_ref = moe_aux_loss(model), moe_aux_loss(eager)
    assert (aux is None) == (aux_ref is None)
    if aux is not None:
        assert torch.allclose(aux, aux_ref, rtol=1e-10, atol=0)
    (y.square().mean() + (aux if aux is not None else 0)).backward()
    (ref.square().mean() + (aux_ref if aux_ref is not None else 0)).backward()
    grads = 0
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None and q.grad.norm() > 0:
            assert_close(f"grad {name}", q.grad, p.grad, TOL[F64])
            grads += 1
    assert grads > 0
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):  # load counters, selection bias
        assert torch.equal(b, c), name
    for m in (model, eager):
        m.eval()
    assert_close("eval output", eager(*inputs), compiled(*inputs), TOL[F64])


@pytest.mark.parametrize("name, over", [
    ("vit_tiny_moe", {"num_experts": 4, "capacity_factor": 0.75, "router_args": {"selection_bias": True}}),
    ("transformer_mt_tiny_moe", {"num_experts": 3, "moe_k": 1, "dropout": 0.0}),
], ids=["vit-capacity-bias", "mt-top1"])
def test_compiled_model_computes_the_eager_model(name, over):
    _compiled_vs_eager(*_tiny(name, **over))


@pytest.mark.parametrize("router", ["adaptive_threshold", "grkan", "task_aware"])
def test_compiled_router_computes_the_eager_router(router):
    _compiled_vs_eager(*_moe_vit(router))


def _task_level_vit():
    """A MoE ViT whose task_aware router routes by task alone (mode="task"), one task per row."""
    model, inputs = _tiny("vit_tiny_moe", num_experts=4, router="task_aware",
                          router_args={**ROUTER_ARGS["task_aware"], "mode": "task"})
    set_task_ids(model, torch.tensor([0, 2]))
    return model, inputs


def test_task_level_router_traces_without_graph_breaks_and_computes_the_eager_router():
    model, inputs = _task_level_vit()
    for train in (True, False):
        model.train(train)
        assert _graph_breaks(model, inputs) == [], train
    _compiled_vs_eager(model, inputs)


def test_compiled_gumbel_eval_noise_is_the_eager_noise():
    model, (x,) = _moe_vit("gumbel")
    model.eval()
    torch._dynamo.reset()  # compiled first, before any eager call could have cached anything
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert_close("gumbel eval", model(x), y, TOL[torch.float32])


def test_compiled_blocks_with_biases_norm_and_lora():
    """The op-by-op path of MoEFeedForward (a norm between the projections, biases) and
    MoLELinear's grouped matmuls, compiled, against eager."""
    ffn = MoEFeedForward(12, num_experts=3, k=2, bias=True, norm_layer=torch.nn.LayerNorm, capacity_factor=1.0)
    mole = MoLELinear(12, 7, num_experts=3, rank=2, router="topk", router_args={"k": 2})
    torch.nn.init.normal_(mole.lora_b)  # B starts at zero: make the experts count
    x = torch.randn(2, 5, 12, dtype=F64)
    for layer in (ffn.double(), mole.double()):
        eager = copy.deepcopy(layer)
        torch._dynamo.reset()
        y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        ref = eager(x)
        assert_close(type(layer).__name__, ref, y, TOL[F64])
        y.sum().backward()
        ref.sum().backward()
        for (name, p), q in zip(layer.named_parameters(), eager.parameters()):
            if q.grad is not None:
                assert_close(f"grad {name}", q.grad, p.grad, TOL[F64])


# --- the static-shape forms of the routing ops, with the trace patched in -----------------------


def _routing(n=11, num_experts=4, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_experts, generator=gen, dtype=F64)
    return route(logits, k)


@pytest.mark.parametrize("capacity, masked", [(None, False), (3, False), (None, True), (2, True)])
def test_traced_plan_keeps_every_assignment_and_agrees_with_eager(monkeypatch, capacity, masked):
    r = _routing()
    keep = torch.rand(r.indices.shape, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    eager = make_plan(r.indices, 4, capacity=capacity, keep=keep)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = make_plan(r.indices, 4, capacity=capacity, keep=keep)
    rows = eager.order.numel()
    assert traced.order.numel() == r.indices.numel()  # all N * k, the dropped ones last
    assert torch.equal(traced.order[:rows], eager.order) and torch.equal(traced.token[:rows], eager.token)
    for field in ("offsets", "position", "counts", "dropped"):
        assert torch.equal(getattr(traced, field), getattr(eager, field)), field
    assert int(traced.offsets[-1]) == rows and int(eager.dropped) == r.indices.numel() - rows
    # the ops on the traced plan give what they give eagerly: permute's extra rows are never read
    x = torch.randn(11, 6, dtype=F64)
    w = torch.randn(4, 6, 5, dtype=F64)
    xs = permute(x, traced)
    assert torch.equal(xs[:rows], permute_eager(x, eager))
    h = grouped_mm(xs, w, traced.offsets)
    assert torch.equal(h[rows:], torch.zeros_like(h[rows:]))  # rows past offsets[-1]: zero
    monkeypatch.undo()
    ref = grouped_mm(permute(x, eager), w, eager.offsets)
    assert_close("grouped_mm", ref, h[:rows], TOL[F64])
    y_ref = unpermute(ref, r.weights.double(), eager)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_close("unpermute", y_ref, unpermute(h, r.weights.double(), traced), TOL[F64])


def permute_eager(x, plan):
    return x[plan.token]


@pytest.mark.parametrize("glu, kind, bias, capacity", [
    (True, "silu", False, None), (True, "gelu", True, 2), (False, "relu", True, None), (False, "silu", False, 3),
])
def test_traced_expert_ffn_equals_eager_with_gradients(monkeypatch, glu, kind, bias, capacity):
    n, d, e, hid, d_out = 9, 6, 4, 5, 7
    r = _routing(n, e)
    g = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)  # noqa: E731
    x, w1, w2 = g(n, d), g(e, d, 2 * hid if glu else hid), g(e, hid, d_out)
    weights = r.weights.double().requires_grad_()
    b1, b2 = (g(e, w1.shape[2]), g(e, d_out)) if bias else (None, None)
    alpha = torch.tensor(0.3, dtype=F64, requires_grad=True) if KINDS[kind].takes_alpha else None
    ins = [t for t in (x, w1, w2, weights, b1, b2, alpha) if t is not None]
    dy = torch.randn(n, d_out, dtype=F64)

    def run():
        plan = make_plan(r.indices, e, capacity=capacity)
        y = expert_ffn(x, w1, w2, weights, plan, kind, glu=glu, alpha=alpha, b1=b1, b2=b2)
        return y, torch.autograd.grad(y, ins, dy)

    y_ref, g_ref = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y, grads = run()
    assert_close("expert_ffn", y_ref, y, TOL[F64])
    for i, (a, b) in enumerate(zip(g_ref, grads)):
        assert_close(f"grad {i}", a, b, TOL[F64])


def test_traced_forms_keep_non_finite_values_to_their_own_expert_and_tokens(monkeypatch):
    """Every expert runs on every token in the traced form: a NaN in one expert's weights must
    still reach only the tokens routed to it, and a NaN token only its own experts' gradients."""
    n, d, e, hid = 8, 4, 3, 5
    indices = torch.tensor([[0, 1], [1, 0]] * 4)  # expert 2 is chosen by no token
    weights = torch.full((n, 2), 0.5, dtype=F64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plan = make_plan(indices, e)
    for poisoned in ("expert", "token"):
        x = torch.randn(n, d, dtype=F64)
        w1 = torch.randn(e, d, 2 * hid, dtype=F64)
        w2 = torch.randn(e, hid, d, dtype=F64)
        if poisoned == "expert":
            w1[2] = float("nan")
        else:
            x[3] = float("nan")
        w1.requires_grad_()
        w2.requires_grad_()
        y = expert_ffn(x, w1, w2, weights, plan, "silu")
        fine = torch.arange(n) != 3 if poisoned == "token" else torch.ones(n, dtype=torch.bool)
        assert torch.isfinite(y[fine]).all() and not torch.isfinite(y[~fine]).any(), poisoned
        y[fine].sum().backward()
        if poisoned == "expert":  # the experts that ran, and the idle one's second matrix (zero)
            assert torch.isfinite(w1.grad[:2]).all() and torch.isfinite(w2.grad).all()
            assert torch.equal(w2.grad[2], torch.zeros_like(w2.grad[2]))
        else:  # the idle expert never saw the NaN token
            assert torch.equal(w1.grad[2], torch.zeros_like(w1.grad[2]))
            assert torch.equal(w2.grad[2], torch.zeros_like(w2.grad[2]))
        h = grouped_mm(permute(x, plan), w1.detach(), plan.offsets)
        assert torch.isfinite(h[plan.token != 3]).all(), poisoned
