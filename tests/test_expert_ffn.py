"""The fused experts' feed-forward (gatezoo.kernels.routing.expert_ffn) and the fast top-k.

expert_ffn against a float64 reference that runs every expert on every token densely: forward
and every gradient (x, w1, w2, the combine weights through the router logits, b1, b2, alpha),
GLU and plain experts, odd sizes, non-contiguous views, each dtype, dropped assignments, idle
experts, blocks of one expert and of several, second order, and the argument checks. Then
topk_lower_first's fast path against its exact int64 keys on rows full of ties, NaN, inf and -0.0.
"""

import pytest
import torch
from closeness import TOL, assert_close

import gatezoo.kernels.routing.torch_path as routing_torch
from gatezoo.blocks import MoEFeedForward
from gatezoo.kernels.activation.kinds import get_kind
from gatezoo.kernels.activation.naive import phi_composed
from gatezoo.kernels.routing import expert_ffn, expert_ffn_composed, make_plan, route
from gatezoo.kernels.routing.torch_path import _topk_exact, expert_blocks, topk_lower_first

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _tol(dtype, backend):
    """The Triton backend runs five kernels in a row and rounds each intermediate (h, the
    activation, the expert outputs) to bfloat16: three roundings, hence a looser bound there."""
    return 3e-2 if dtype == torch.bfloat16 and backend == "triton" else TOL[dtype]

# (kind, glu, alpha, bias, capacity factor)
CONFIGS = {
    "swiglu": ("silu", True, None, False, None),
    "xgeglu+bias": ("gelu", True, 0.3, True, None),
    "relu-mlp+bias+capacity": ("relu", False, None, True, 0.6),
    "xsigmoid-mlp": ("sigmoid", False, 0.2, False, None),
    "atlu-glu+capacity": ("atlu", True, None, False, 0.5),
}


def dense_reference(x, w1, w2, weights, plan, kind, glu, alpha, b1, b2):
    """float64: every expert on every token (E, N, d_out), then each kept assignment's row
    weighted and summed; no permutation, no sorted rows."""
    spec = get_kind(kind)
    h = torch.einsum("nd,edh->enh", x, w1)
    if b1 is not None:
        h = h + b1[:, None, :]
    half = w2.shape[1]
    a = phi_composed(h[..., :half], spec, alpha) * h[..., half:] if glu else phi_composed(h, spec, alpha)
    f = torch.einsum("enh,eho->eno", a, w2)
    if b2 is not None:
        f = f + b2[:, None, :]
    expert_of_row = torch.repeat_interleave(torch.arange(w1.shape[0]), plan.counts)
    kept = plan.position >= 0
    experts = expert_of_row[plan.position.clamp(min=0)]  # (N, k)
    tokens = torch.arange(x.shape[0])[:, None].expand_as(experts)
    rows = f[experts, tokens]  # (N, k, d_out)
    return (torch.where(kept, weights, 0.0)[..., None] * rows).sum(1)


def _problem(config, dtype, n=13, d=5, hidden=7, d_out=6, num_experts=5, k=2, idle=()):
    """Non-contiguous inputs of odd sizes; expert ``idle`` chosen by no token."""
    kind, glu, alpha, bias, capacity = config
    width = 2 * hidden if glu else hidden
    x = torch.randn(d, n + 2).t()[1:-1]  # a transposed, offset view
    w1 = torch.randn(num_experts, width, d).transpose(1, 2) / d ** 0.5  # non-contiguous expert matrices
    w2 = torch.randn(num_experts, hidden, d_out) / hidden ** 0.5
    logits = torch.randn(n, num_experts)
    if idle:
        logits[:, list(idle)] = -1e4
    extra = {
        "b1": torch.randn(num_experts, width) if bias else None,
        "b2": torch.randn(num_experts, d_out) if bias else None,
        "alpha": torch.tensor(alpha) if alpha is not None else None,
    }
    cap = None if capacity is None else int(capacity * n * k / num_experts)
    cast = {name: (t.to(dtype) if name != "alpha" and t is not None else t) for name, t in extra.items()}
    return (x.to(dtype), w1.to(dtype), w2.to(dtype), logits), cast, extra, (kind, glu, k, cap)


def _run(x, w1, w2, logits, extra, kind, glu, k, cap, num_experts, backend):
    r = route(logits, k)
    plan = make_plan(r.indices, num_experts, capacity=cap)
    weights = r.weights.to(x.dtype)
    if backend == "reference":
        return dense_reference(x, w1, w2, weights, plan, kind, glu, extra["alpha"], extra["b1"], extra["b2"]), plan
    return expert_ffn(x, w1, w2, weights, plan, kind, glu=glu, alpha=extra["alpha"], b1=extra["b1"],
                      b2=extra["b2"], backend=backend), plan


@pytest.mark.parametrize("block", [None, 1, 40], ids=["one-block", "expert-blocks", "mixed-blocks"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_expert_ffn_matches_float64(name, dtype, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(routing_torch, "FFN_BLOCK_ELEMENTS", block)
    num_experts = 5
    base, cast, extra, (kind, glu, k, cap) = _problem(CONFIGS[name], dtype, num_experts=num_experts, idle=(3,))

    def inputs(dt, src):
        ts = [t.detach().to(dt).requires_grad_() for t in base]
        ex = {key: (None if t is None else t.detach().to(dt if key != "alpha" else torch.float64 if dt ==
                                                        torch.float64 else torch.float32).requires_grad_())
              for key, t in src.items()}
        return ts, ex

    ref_ts, ref_ex = inputs(torch.float64, extra)
    ref, ref_plan = _run(*ref_ts, ref_ex, kind, glu, k, cap, num_experts, "reference")
    assert ref_plan.counts[3] == 0  # an idle expert
    if cap is not None:
        assert int(ref_plan.dropped) > 0  # something was dropped
    dy = torch.randn(ref.shape, dtype=torch.float64)
    ref_leaves = ref_ts + [t for t in ref_ex.values() if t is not None]
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    for backend in ("torch", "triton"):
        ts, ex = inputs(dtype, cast)
        out, plan = _run(*ts, ex, kind, glu, k, cap, num_experts, backend)
        assert torch.equal(plan.order, ref_plan.order)
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close(f"{name} out [{backend}]", ref, out, _tol(dtype, backend))
        leaves = ts + [t for t in ex.values() if t is not None]
        grads = torch.autograd.grad(out, leaves, dy.to(dtype))
        names = ["dx", "dw1", "dw2", "dlogits"] + [f"d{key}" for key, t in ex.items() if t is not None]
        for g_name, r, g, leaf in zip(names, ref_grads, grads, leaves):
            assert g.dtype == leaf.dtype and g.shape == leaf.shape
            # the combine weights are float32 by design, so their gradient is held to fp32 at best
            tol = max(_tol(dtype, backend), 1e-4) if g_name == "dlogits" else _tol(dtype, backend)
            if g_name == "dalpha" and dtype != torch.float32:
                # one scalar summed over every element with cancellation, so its relative error
                # in half precision says little (the op-by-op path's reaches 1.5e-2 here too):
                # dalpha is held to float32's bound above and to 1e-12 in float64 below
                continue
            assert_close(f"{name} {g_name} [{backend}]", r, g, tol)
        for g_name, g in zip(names[1:3], grads[1:3]):  # the idle expert's weight gradients are zero
            assert not g[3].any(), g_name


def test_expert_ffn_float64_is_exact_to_rounding():
    """In float64 the fused path equals the dense reference to 1e-12, gradients included."""
    base, _, extra, (kind, glu, k, cap) = _problem(CONFIGS["xgeglu+bias"], torch.float64)
    ts = [t.double().requires_grad_() for t in base]
    ex = {key: t.double().requires_grad_() for key, t in extra.items()}
    dy = torch.randn(13, 6, dtype=torch.float64)
    results = []
    for backend in ("reference", "torch"):
        out, _ = _run(*ts, ex, kind, glu, k, cap, 5, backend)
        results.append((out, torch.autograd.grad(out, ts + list(ex.values()), dy)))
    (ref, ref_grads), (out, grads) = results
    assert_close("out", ref, out, 1e-12)
    for r, g in zip(ref_grads, grads):
        assert_close("grad", r, g, 1e-12)


@pytest.mark.parametrize("block", [None, 1])
def test_expert_ffn_second_order_matches_the_composition(block, monkeypatch):
    """create_graph=True: the fused Function hands over to the composition."""
    if block is not None:
        monkeypatch.setattr(routing_torch, "FFN_BLOCK_ELEMENTS", block)
    base, _, extra, (kind, glu, k, cap) = _problem(CONFIGS["xgeglu+bias"], torch.float64)
    results = []
    for backend in ("reference", "torch"):
        ts = [t.double().requires_grad_() for t in base]
        ex = {key: t.double().requires_grad_() for key, t in extra.items()}
        out, _ = _run(*ts, ex, kind, glu, k, cap, 5, backend)
        leaves = ts + list(ex.values())
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        results.append([t.grad for t in leaves])
    for r, g in zip(*results):
        # the composition's un-permute takes its products in float32 (as the combine weights are)
        assert_close("second order", r, g, 1e-6)


def test_expert_ffn_gradcheck():
    base, _, extra, (kind, glu, k, cap) = _problem(CONFIGS["xsigmoid-mlp"], torch.float64, n=6, num_experts=3)
    r = route(base[3], k)
    plan = make_plan(r.indices, 3)
    weights = r.weights.double().requires_grad_()
    x, w1, w2 = (t.double().requires_grad_() for t in base[:3])
    alpha = extra["alpha"].double().requires_grad_()

    def fn(x, w1, w2, weights, alpha):
        return expert_ffn(x, w1, w2, weights, plan, kind, glu=glu, alpha=alpha, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, w1, w2, weights, alpha))


def test_expert_ffn_without_rows_and_without_inputs_that_need_grad():
    x = torch.randn(4, 3)
    w1, w2 = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 4, 3)
    plan = make_plan(torch.tensor([[0], [1], [0], [1]]), 2, keep=torch.zeros(4, 1, dtype=torch.bool))
    out = expert_ffn(x, w1, w2, torch.ones(4, 1), plan, "silu", backend="torch")
    assert torch.equal(out, torch.zeros(4, 3))
    # only w1 needs a gradient: the others are skipped, w1's is still right
    plan = make_plan(torch.tensor([[0], [1], [0], [1]]), 2)
    out = expert_ffn(x, w1, w2, torch.ones(4, 1), plan, "silu", backend="torch")
    ref = expert_ffn_composed(x, w1, w2, torch.ones(4, 1), plan, get_kind("silu"), True)
    (g,), (r,) = torch.autograd.grad(out.sum(), [w1]), torch.autograd.grad(ref.sum(), [w1])
    assert_close("dw1", r, g, 1e-5)


def test_expert_blocks_partition_the_rows():
    bounds = [0, 5, 5, 30, 31, 40, 100, 100]
    for width, target, count in ((1, 1 << 20, 1), ((1 << 20) // 10, 10, 3), (1 << 21, 1, 5)):
        assert max(1, routing_torch.FFN_BLOCK_ELEMENTS // width) == target
        blocks = expert_blocks(bounds, width)
        assert len(blocks) == count
        assert blocks[0][0] == 0 and blocks[-1][1] == 100
        for (lo, hi, experts, rows), nxt in zip(blocks, blocks[1:] + [None]):
            if nxt is not None:
                assert nxt[0] == hi and hi - lo >= target  # only the last block may fall short
            assert sum(rows) == hi - lo and all(r > 0 for r in rows)
            assert all(bounds[e + 1] - bounds[e] == r for e, r in zip(experts, rows))
        listed = [e for b in blocks for e in b[2]]
        assert listed == [e for e in range(7) if bounds[e + 1] > bounds[e]]


def test_moe_layer_takes_the_fused_path_unless_something_sits_between_the_projections():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    plain = MoEFeedForward(16, 24, num_experts=4, k=2, backend="torch")
    calls = []
    original = routing_torch.ExpertFFNFunction.apply
    routing_torch.ExpertFFNFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        y = plain(x)
        assert calls, "the fused op was not used"
        calls.clear()
        normed = MoEFeedForward(16, 24, num_experts=4, k=2, norm_layer=torch.nn.LayerNorm, backend="torch")
        normed(x)
        dropped = MoEFeedForward(16, 24, num_experts=4, k=2, drop=0.1, backend="torch")
        dropped(x)
        assert not calls, "a norm or a dropout between the projections needs the op-by-op path"
        dropped.eval()
        dropped(x)
        assert calls, "in eval mode dropout is the identity: the fused op applies"
    finally:
        routing_torch.ExpertFFNFunction.apply = original
    with torch.no_grad():  # without autograd the pre-activation lives in scratch: same output
        assert torch.equal(plain(x), y)
    r = plain.last_routing
    plan = make_plan(r.indices, 4)
    ref = expert_ffn_composed(x.reshape(-1, 16), plain.w1, plain.w2, r.weights, plan, get_kind("silu"), True)
    assert_close("layer vs composition", ref, y.reshape(-1, 16), 1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_topk_fast_path_equals_the_exact_keys(seed):
    """Rows with ties (at and inside the top k), +-NaN, +-inf and -0.0: the float topk decides only
    the rows it can, the rest take the exact int64 keys; together they equal the exact keys."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(60):
        num = int(torch.randint(2, 12, (), generator=gen))
        k = int(torch.randint(1, num + 1, (), generator=gen))
        s = torch.randint(-3, 4, (40, num), generator=gen).float()
        s += torch.randn(40, num, generator=gen) * float(torch.rand((), generator=gen) < 0.5)
        for value, p in ((float("nan"), 0.04), (-float("nan"), 0.04), (-0.0, 0.05), (float("inf"), 0.03),
                         (-float("inf"), 0.03)):
            s[torch.rand(40, num, generator=gen) < p] = value
        assert torch.equal(topk_lower_first(s, k), _topk_exact(s, k)), (s, k)
    # real-valued logits: every row on the fast path, same answer
    s = torch.randn(500, 16, generator=gen)
    assert torch.equal(topk_lower_first(s, 2), _topk_exact(s, 2))


def _ffn_args(**over):
    plan = make_plan(torch.tensor([[0, 1], [1, 2], [2, 0]]), 3)
    args = dict(x=torch.randn(3, 4), w1=torch.randn(3, 4, 10), w2=torch.randn(3, 5, 6), weights=torch.rand(3, 2),
                plan=plan, kind="silu")
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(x=torch.randn(3, 4, 1)), ValueError, "x must have 2 dimensions"),
        (dict(x=torch.arange(12).view(3, 4)), TypeError, "x must be"),
        (dict(plan=(1, 2)), TypeError, "plan must be a DispatchPlan"),
        (dict(kind="swish"), ValueError, "kind must be one of"),
        (dict(glu=1), TypeError, "glu must be a bool"),
        (dict(w1=torch.randn(2, 4, 10)), ValueError, "w1 must have shape"),
        (dict(w1=torch.randn(3, 5, 10)), ValueError, "w1 must have shape"),
        (dict(w1=torch.randn(3, 4, 9)), ValueError, "w1 must have shape"),
        (dict(w1=torch.randn(3, 4, 10).double()), TypeError, "w1 must have x's dtype"),
        (dict(w2=torch.randn(3, 4, 6)), ValueError, "w2 must have shape"),
        (dict(w2=torch.randn(3, 5)), ValueError, "w2 must have 3 dimensions"),
        (dict(b1=torch.randn(3, 5)), ValueError, "b1 must have shape"),
        (dict(b2=torch.randn(3, 5)), ValueError, "b2 must have shape"),
        (dict(weights=torch.rand(3, 1)), ValueError, "weights of shape"),
        (dict(x=torch.randn(4, 4)), ValueError, "cover the plan's 3 tokens"),
        (dict(alpha=0.1, kind="relu"), ValueError, "alpha is not defined"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_expert_ffn_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        expert_ffn(**_ffn_args(**over))
