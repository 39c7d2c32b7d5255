"""MoE routing ops: the Triton kernels against the torch path, both against the float64 composition.

route, make_plan (capacity, keep), permute, unpermute and grouped_mm: forward and every gradient,
odd sizes, non-contiguous inputs, each dtype, dropped assignments, empty experts, second order
and the argument checks.
"""

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.kernels.routing import (
    DispatchPlan,
    grouped_mm,
    grouped_mm_composed,
    make_plan,
    permute,
    permute_composed,
    route,
    route_composed,
    unpermute,
    unpermute_composed,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torch", "triton")


def _grads(out, ins, g):
    return torch.autograd.grad(out, ins, g)


def _three_way(name, ref, got, tol):
    """got: {"torch": tensor, "triton": tensor}; both against the float64 reference and each other."""
    for backend, t in got.items():
        assert_close(f"{name} [{backend}]", ref, t, tol)
    assert_close(f"{name} [triton vs torch]", got["torch"].double(), got["triton"], tol)


def _choices(n, num_experts, k, skip=()):
    """(n, k) distinct expert choices per token, never choosing the experts in ``skip``."""
    pool = torch.tensor([e for e in range(num_experts) if e not in skip])
    return torch.stack([pool[torch.randperm(len(pool))[:k]] for _ in range(n)])


# --- route -----------------------------------------------------------------------------------


RULES = [("softmax", "scores"), ("sigmoid", "scores"), ("softmax", "logits"), ("sigmoid", "logits")]
RULE_IDS = ["softmax", "sigmoid", "softmax-bias_on_logits", "sigmoid-bias_on_logits"]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("num_experts, k", [(5, 1), (7, 3), (5, 2)])
@pytest.mark.parametrize("extras, score, bias_on", [
    (False, "softmax", "scores"), (False, "sigmoid", "scores"),  # without a bias, bias_on changes nothing
    *((True, score, bias_on) for score, bias_on in RULES),
], ids=["plain", "plain-sigmoid", *("bias+noise-" + name for name in RULE_IDS)])
def test_route_matches_float64(dtype, num_experts, k, extras, score, bias_on):
    n = 13
    # a transposed (non-contiguous) view of the logits
    logits = torch.randn(num_experts, n).t().to(dtype)
    # on the scores the bias must be of their size (< 1) to matter without deciding alone
    bias = torch.randn(num_experts) * (0.2 if bias_on == "scores" else 1.0) if extras else None
    noise = torch.randn(n, 2 * num_experts)[:, ::2].to(dtype) if extras else None  # strided columns
    scale = 0.7 if extras else 1.0
    ref_l = logits.double().requires_grad_()
    ref_n = noise.double().requires_grad_() if extras else None
    ref = route_composed(ref_l, k, bias, ref_n, scale, score, bias_on)
    dw = torch.randn(n, k)
    ref_ins = [ref_l] + ([ref_n] if extras else [])
    ref_grads = _grads(ref.weights, ref_ins, dw.double())
    got = {}
    for backend in BACKENDS:
        ins = [logits.clone().requires_grad_()] + ([noise.clone().requires_grad_()] if extras else [])
        r = route(ins[0], k, bias=bias, noise=ins[1] if extras else None, scale=scale, score=score,
                  bias_on=bias_on, backend=backend)
        assert r.weights.dtype == torch.float32 and r.indices.dtype == torch.int64 and r.counts.dtype == torch.int64
        assert torch.equal(r.indices, ref.indices), backend
        assert torch.equal(r.counts, ref.counts), backend
        grads = _grads(r.weights, ins, dw)
        for g, t in zip(grads, ins):
            assert g.dtype == t.dtype
        got[backend] = (r.weights, *grads)
    _three_way("weights", ref.weights, {b: v[0] for b, v in got.items()}, 1e-5)
    for i, name in enumerate(["dlogits", "dnoise"][: len(ref_grads)]):
        _three_way(name, ref_grads[i], {b: v[i + 1] for b, v in got.items()}, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_k_equals_experts_is_sorted_softmax(backend):
    logits = torch.randn(9, 6)
    r = route(logits, 6, backend=backend)
    expect = torch.sort(logits, dim=-1, descending=True)
    assert torch.equal(r.indices, expect.indices)
    assert_close("weights", torch.softmax(expect.values.double(), -1), r.weights, 1e-6)
    assert torch.equal(r.counts, torch.full((6,), 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_ties_pick_the_lower_expert_and_bias_only_selects(backend):
    zeros = torch.zeros(5, 8)  # a zero-initialised router: every logit ties
    r = route(zeros, 3, backend=backend)
    assert torch.equal(r.indices, torch.tensor([[0, 1, 2]]).expand(5, 3))
    assert_close("uniform", torch.full((5, 3), 1 / 3, dtype=torch.float64), r.weights, 1e-6)
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0], [-0.0, 0.0, -1.0, 0.0, float("-inf")]])
    r = route(logits, 2, backend=backend)
    assert r.indices.tolist() == [[1, 2], [0, 1]]
    # the bias picks experts 3 and 4 but the weights are the softmax of their plain logits
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0, 20.0])
    x = torch.tensor([[0.5, 0.1, 0.2, 0.3, -0.4]])
    r = route(x, 2, bias=bias, backend=backend)
    assert r.indices.tolist() == [[4, 3]]
    assert_close("weights", torch.softmax(torch.tensor([[-0.4, 0.3]], dtype=torch.float64), -1), r.weights, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_bias_on_the_scores_is_deepseek_v3_eq16(backend):
    """A row where the two rules differ: logits (2, 0, 0), bias (-1.5, 0, 0), k = 1. On the
    logits, l + b = (0.5, 0, 0) keeps expert 0; on the softmax scores (0.79, 0.11, 0.11),
    s + b = (-0.71, 0.11, 0.11) drops it (and sigmoid's 0.88 - 1.5 < 0.5 as well)."""
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    bias = torch.tensor([-1.5, 0.0, 0.0])
    on_logits = route(logits, 1, bias=bias, bias_on="logits", backend=backend)
    on_scores = route(logits, 1, bias=bias, backend=backend)
    assert on_logits.indices.tolist() == [[0]] and on_scores.indices.tolist() == [[1]]
    for score in ("softmax", "sigmoid"):
        r = route(logits, 2, bias=bias, score=score, backend=backend)
        assert r.indices.tolist() == [[1, 2]]  # a tie of equal scores: the lower expert first
        assert_close(score, torch.tensor([[0.5, 0.5]], dtype=torch.float64), r.weights, 1e-6)
    r = route(torch.tensor([[1.0, -1.0, 3.0]]), 2, bias=torch.tensor([0.0, 2.0, 0.0]), score="sigmoid",
              backend=backend)
    sig = torch.sigmoid(torch.tensor([-1.0, 3.0], dtype=torch.float64))
    assert r.indices.tolist() == [[1, 2]]
    assert_close("sigmoid weights: the selected sigmoids renormalised", (sig / sig.sum())[None], r.weights, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score, bias_on", RULES, ids=RULE_IDS)
def test_route_nan_score_gives_nan_weights_for_its_row_only(backend, score, bias_on):
    """A NaN logit makes its row's weights NaN on every rule (with softmax scores the whole row's
    scores are NaN, so the NaN column need not be selected); other rows stay finite. A NaN bias
    makes every row's weights NaN."""
    logits = torch.randn(4, 6)
    logits[2, 5] = float("nan")
    logits[1, 0] = -float("nan")  # the sign bit set: the torch path's integer keys rank it last
    bias = torch.zeros(6)
    r = route(logits, 2, bias=bias, score=score, bias_on=bias_on, backend=backend)
    assert torch.isnan(r.weights[[1, 2]]).all() and torch.isfinite(r.weights[[0, 3]]).all()
    ref = route_composed(logits, 2, bias, None, 1.0, score, bias_on)
    assert torch.equal(torch.isnan(ref.weights), torch.isnan(r.weights))
    bias[3] = float("nan")  # a NaN bias is in every row's selection scores
    r = route(torch.randn(4, 6), 2, bias=bias, score=score, bias_on=bias_on, backend=backend)
    assert torch.isnan(r.weights).all() and ((r.indices >= 0) & (r.indices < 6)).all()


def test_route_selection_by_noise_then_scale():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    noise = torch.tensor([[5.0, 0.0, 0.0]])
    for backend in BACKENDS:
        r = route(logits, 1, noise=noise, scale=2.0, backend=backend)
        assert r.indices.tolist() == [[0]] and r.weights.tolist() == [[1.0]]


# --- make_plan -------------------------------------------------------------------------------


def _plan_by_hand_loops(indices, num_experts, capacity, keep):
    """Brute force: kept flags from walking each expert's assignments slot-major."""
    n, k = indices.shape
    kept = torch.ones(n, k, dtype=torch.bool) if keep is None else keep.clone()
    for e in range(num_experts):
        taken = 0
        for j in range(k):
            for t in range(n):
                if indices[t, j] == e and kept[t, j]:
                    if capacity is not None and taken >= capacity:
                        kept[t, j] = False
                    else:
                        taken += 1
    return kept


def test_plan_capacity_drops_the_documented_assignments():
    # slot 0: t0->0, t1->0, t2->1, t3->0; slot 1: t0->1, t1->2, t2->0, t3->1; capacity 2.
    # expert 0 ranks t0/j0, t1/j0, t3/j0 (dropped), t2/j1 (dropped); expert 1 ranks t2/j0,
    # t0/j1, t3/j1 (dropped); expert 2 has t1/j1 only.
    indices = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    plan = make_plan(indices, 3, capacity=2)
    # kept m = 0 (e0), 1 (e1), 2 (e0), 3 (e2), 4 (e1): by expert, stable in m -> 0, 2 | 1, 4 | 3
    assert plan.order.tolist() == [0, 2, 1, 4, 3]
    assert plan.token.tolist() == [0, 1, 0, 2, 1]
    assert plan.offsets.tolist() == [0, 2, 4, 5]
    assert plan.counts.tolist() == [2, 2, 1]
    assert plan.position.tolist() == [[0, 2], [1, 4], [3, -1], [-1, -1]]
    assert int(plan.dropped) == 3
    # keep masks t1/j0 out first: expert 0 then keeps t0/j0 and t3/j0 and drops t2/j1
    keep = torch.tensor([[True, True], [False, True], [True, True], [True, True]])
    plan = make_plan(indices, 3, capacity=2, keep=keep)
    assert plan.order.tolist() == [0, 6, 1, 4, 3]
    assert plan.token.tolist() == [0, 3, 0, 2, 1]
    assert plan.offsets.tolist() == [0, 2, 4, 5]
    assert plan.position.tolist() == [[0, 2], [-1, 4], [3, -1], [1, -1]]
    assert int(plan.dropped) == 3
    # no capacity: everything but the masked assignment, sorted by expert
    plan = make_plan(indices, 3, keep=keep)
    assert plan.order.tolist() == [0, 5, 6, 1, 4, 7, 3]
    assert int(plan.dropped) == 1


@pytest.mark.parametrize("seed", range(4))
def test_plan_invariants_against_brute_force(seed):
    torch.manual_seed(seed)
    n, num_experts, k = 17, 5, 3
    indices = _choices(n, num_experts, k, skip=(3,) if seed % 2 else ())
    keep = torch.rand(n, k) > 0.25 if seed >= 2 else None
    capacity = [None, 4, 6, 0][seed]
    plan = make_plan(indices.int(), num_experts, capacity=capacity, keep=keep)
    assert isinstance(plan, DispatchPlan)
    kept = _plan_by_hand_loops(indices, num_experts, capacity, keep)
    assert torch.equal(plan.position >= 0, kept)
    assert int(plan.dropped) == int((~kept).sum())
    flat = indices.reshape(-1)
    assert torch.equal(plan.order, torch.nonzero(kept.reshape(-1)).flatten()[torch.sort(flat[kept.reshape(-1)],
                                                                                        stable=True).indices])
    assert torch.equal(plan.token, plan.order // k)
    assert torch.equal(plan.counts, torch.bincount(flat[kept.reshape(-1)], minlength=num_experts))
    assert torch.equal(plan.offsets, torch.cat([torch.zeros(1, dtype=torch.long), plan.counts.cumsum(0)]))
    assert torch.equal(plan.position.reshape(-1)[plan.order], torch.arange(plan.order.numel()))
    if capacity is not None:
        assert int(plan.counts.max()) <= capacity


# --- permute, unpermute ----------------------------------------------------------------------


def _plan_with_drops(n=13, num_experts=5, k=2):
    """A plan with an empty expert (3) and dropped assignments (a capacity one below the busiest
    expert's load)."""
    indices = _choices(n, num_experts, k, skip=(3,))
    return make_plan(indices, num_experts, capacity=int(torch.bincount(indices.flatten()).max()) - 1)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("k", [1, 3])
def test_permute_matches_float64(dtype, k):
    n, d = 13, 9
    plan = _plan_with_drops(n, 7, k)
    assert int(plan.dropped) > 0
    x = torch.randn(d, n).t().to(dtype)  # transposed view
    ref_x = x.double().requires_grad_()
    ref = permute_composed(ref_x, plan)
    g = torch.randn(ref.shape).to(dtype)
    (ref_dx,) = _grads(ref, [ref_x], g.double())
    outs, dxs = {}, {}
    for backend in BACKENDS:
        xi = x.clone().requires_grad_()
        out = permute(xi, plan, backend=backend)
        assert out.dtype == dtype
        assert torch.equal(out, x[plan.token])  # a gather is exact
        outs[backend] = out
        (dxs[backend],) = _grads(out, [xi], g)
    _three_way("dx", ref_dx, dxs, TOL[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("k", [2, 3])
def test_unpermute_matches_float64(dtype, k):
    n, d = 13, 24
    plan = _plan_with_drops(n, 7, k)
    m = plan.order.numel()
    y = torch.randn(2 * m, d)[::2].to(dtype)  # every other row: a strided view
    w = torch.rand(k, n).t()  # transposed float32 weights
    ref_in = [y.double().requires_grad_(), w.double().requires_grad_()]
    ref = unpermute_composed(*ref_in, plan)
    g = torch.randn(ref.shape).to(dtype)
    ref_grads = _grads(ref, ref_in, g.double())
    got = {}
    for backend in BACKENDS:
        ins = [y.clone().requires_grad_(), w.clone().requires_grad_()]
        out = unpermute(*ins, plan, backend=backend)
        assert out.dtype == dtype
        got[backend] = (out, *_grads(out, ins, g))
    for i, name in enumerate(("out", "dy", "dweights")):
        ref_t = ref if i == 0 else ref_grads[i - 1]
        _three_way(name, ref_t, {b: v[i] for b, v in got.items()}, TOL[dtype])
    # dropped assignments get a zero weight gradient from both backends
    for backend in BACKENDS:
        assert torch.all(got[backend][2][plan.position < 0] == 0)


def test_unpermute_sums_float64_in_float64():
    # the torch path sums float32 inputs in float32, float64 ones in float64 (a reference's precision)
    n, d, k = 11, 7, 3
    plan = _plan_with_drops(n, 5, k)
    y = torch.randn(plan.order.numel(), d, dtype=torch.float64)
    w = torch.rand(n, k, dtype=torch.float64)
    ins = [y.clone().requires_grad_(), w.clone().requires_grad_()]
    ref_in = [y.clone().requires_grad_(), w.clone().requires_grad_()]
    out = unpermute(*ins, plan, backend="torch")
    ref = unpermute_composed(*ref_in, plan)
    assert out.dtype == torch.float64
    g = torch.randn(n, d, dtype=torch.float64)
    for a, b in zip((out, *_grads(out, ins, g)), (ref, *_grads(ref, ref_in, g))):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_when_everything_is_dropped(backend):
    plan = make_plan(torch.tensor([[0, 1], [1, 0]]), 2, capacity=0)
    y = torch.zeros(0, 5, requires_grad=True)
    w = torch.rand(2, 2, requires_grad=True)
    out = unpermute(y, w, plan, backend=backend)
    assert torch.equal(out, torch.zeros(2, 5))
    dy, dw = _grads(out, [y, w], torch.randn(2, 5))
    assert dy.shape == (0, 5) and torch.equal(dw, torch.zeros(2, 2))


# --- grouped_mm ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_grouped_mm_matches_float64(dtype):
    kdim, ndim = 9, 24
    offsets = torch.tensor([0, 7, 7, 20, 21, 33])  # expert 1 has no rows
    m = 36  # 3 rows past offsets[-1]
    x = torch.randn(kdim, m).t().to(dtype)  # transposed views of x and the weights
    weight = torch.randn(5, ndim, kdim).transpose(1, 2).to(dtype)
    ref_in = [x.double().requires_grad_(), weight.double().requires_grad_()]
    ref = grouped_mm_composed(*ref_in, offsets)
    g = torch.randn(m, ndim).to(dtype)
    ref_grads = _grads(ref, ref_in, g.double())
    got = {}
    for backend in BACKENDS:
        ins = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        out = grouped_mm(*ins, offsets, backend=backend)
        assert out.dtype == dtype
        dx, dw = _grads(out, ins, g)
        assert dx.dtype == dtype and dw.dtype == dtype
        assert torch.equal(out[33:], torch.zeros(3, ndim, dtype=dtype)), backend  # rows past the end
        assert torch.equal(dx[33:], torch.zeros(3, kdim, dtype=dtype)), backend
        assert torch.equal(dw[1], torch.zeros(kdim, ndim, dtype=dtype)), backend  # the empty expert
        got[backend] = (out, dx, dw)
    for i, name in enumerate(("out", "dx", "dweight")):
        ref_t = ref if i == 0 else ref_grads[i - 1]
        _three_way(name, ref_t, {b: v[i] for b, v in got.items()}, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_many_tiles_int32_offsets(backend):
    """Several row tiles per expert, K over several K tiles, int32 offsets, float32 exact to 1e-5."""
    offsets = torch.tensor([0, 0, 40, 41, 75], dtype=torch.int32)
    x = torch.randn(75, 37, requires_grad=True)
    weight = torch.randn(4, 37, 18, requires_grad=True)
    out = grouped_mm(x, weight, offsets, backend=backend)
    ref_in = [x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    ref = grouped_mm_composed(*ref_in, offsets.long())
    assert_close("out", ref, out, 1e-5)
    g = torch.randn(out.shape)
    for name, a, b in zip(("dx", "dw"), _grads(ref, ref_in, g.double()), _grads(out, [x, weight], g)):
        assert_close(name, a, b, 1e-5)


def test_grouped_mm_gradcheck_torch_path():
    offsets = torch.tensor([0, 2, 2, 5])
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offsets, backend="torch"), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: grouped_mm(a, b, offsets, backend="torch"), (x, w))


# --- the whole MoE path and second order -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_pipeline_second_order_matches_float64(backend):
    """create_graph=True through every op (the Triton and torch Functions hand over to the
    compositions) gives the float64 composition's second-order gradients."""
    n, num_experts, k, d, hidden = 7, 4, 2, 5, 6
    logits = torch.randn(n, num_experts)
    x = torch.randn(n, d)
    w1 = torch.randn(num_experts, d, hidden) * 0.5
    ref_in = [t.double().requires_grad_() for t in (logits, x, w1)]
    got_in = [t.clone().requires_grad_() for t in (logits, x, w1)]

    def moe(lg, xx, ww, ops):
        r = ops["route"](lg, k)
        plan = make_plan(r.indices, num_experts, capacity=3)
        h = ops["grouped_mm"](ops["permute"](xx, plan), ww, plan.offsets)
        return ops["unpermute"](h, r.weights.to(h.dtype), plan)

    naive_ops = dict(route=route_composed, grouped_mm=grouped_mm_composed, permute=permute_composed,
                     unpermute=unpermute_composed)
    ops = dict(route=lambda lg, kk: route(lg, kk, backend=backend),
               grouped_mm=lambda a, b, o: grouped_mm(a, b, o, backend=backend),
               permute=lambda a, p: permute(a, p, backend=backend),
               unpermute=lambda a, b, p: unpermute(a, b, p, backend=backend))
    for table, args in ((naive_ops, ref_in), (ops, got_in)):
        out = moe(*args, table)
        grads = torch.autograd.grad(out.square().sum(), args, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
    for name, a, b in zip(("logits", "x", "w1"), ref_in, got_in):
        assert_close("second order d" + name, a.grad, b.grad, 1e-4)


# --- argument checks -------------------------------------------------------------------------


def _plan():
    return make_plan(torch.tensor([[0, 1], [1, 2], [2, 0]]), 3)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: route(torch.randn(4, 3), 4), ValueError, "k must be"),
        (lambda: route(torch.randn(4, 3), 0), ValueError, "k must be"),
        (lambda: route(torch.randn(4, 3), 1.0), ValueError, "k must be"),
        (lambda: route(torch.randn(4, 0), 1), ValueError, "k must be"),
        (lambda: route(torch.randn(4), 1), ValueError, "logits must have 2 dimensions"),
        (lambda: route(torch.arange(12).view(4, 3), 1), TypeError, "logits must be"),
        (lambda: route(torch.randn(4, 3), 1, bias=torch.randn(4)), ValueError, "bias must have shape"),
        (lambda: route(torch.randn(4, 3), 1, score="relu"), ValueError, r"score must be one of \('softmax', "),
        (lambda: route(torch.randn(4, 3), 1, score=None), TypeError, "score must be one of"),
        (lambda: route(torch.randn(4, 3), 1, bias_on="weights"), ValueError, r"bias_on must be one of \('scores', "),
        (lambda: route(torch.randn(4, 3), 1, noise=torch.randn(4, 2)), ValueError, "noise must have"),
        (lambda: route(torch.randn(4, 3), 1, scale=0.0), ValueError, "scale must be"),
        (lambda: make_plan(torch.randn(3, 2), 3), TypeError, "indices must be"),
        (lambda: make_plan(torch.tensor([0, 1]), 3), ValueError, "indices must have shape"),
        (lambda: make_plan(torch.tensor([[0, 3]]), 3), ValueError, "indices must lie"),
        (lambda: make_plan(torch.tensor([[0, 1]]), 0), ValueError, "num_experts"),
        (lambda: make_plan(torch.tensor([[0, 1]]), 3, capacity=-1), ValueError, "capacity"),
        (lambda: make_plan(torch.tensor([[0, 1]]), 3, keep=torch.ones(1, 2)), ValueError, "keep must be"),
        (lambda: make_plan(torch.tensor([[0, 1]]), 3, keep=torch.ones(2, 2, dtype=torch.bool)), ValueError,
         "keep must be"),
        (lambda: permute(torch.randn(4, 5), _plan()), ValueError, "x must have the plan's 3 tokens"),
        (lambda: permute(torch.randn(3, 5), (1, 2)), TypeError, "plan must be a DispatchPlan"),
        (lambda: permute(torch.arange(15).view(3, 5), _plan()), TypeError, "x must be"),
        (lambda: unpermute(torch.randn(6, 5), torch.rand(3, 1), _plan()), ValueError, "weights must have"),
        (lambda: unpermute(torch.randn(5, 5), torch.rand(3, 2), _plan()), ValueError, "y must have one row"),
        (lambda: unpermute(torch.randn(6, 5), torch.ones(3, 2, dtype=torch.long), _plan()), TypeError,
         "weights must be"),
        (lambda: grouped_mm(torch.randn(5, 3), torch.randn(2, 4, 6), torch.tensor([0, 2, 5])), ValueError,
         "weight must have shape"),
        (lambda: grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 6).half(), torch.tensor([0, 2, 5])), TypeError,
         "weight must have x's dtype"),
        (lambda: grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 6), torch.tensor([0.0, 2, 5])), TypeError,
         "offsets must be"),
        (lambda: grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 6), torch.tensor([0, 5])), ValueError,
         "offsets must have shape"),
        (lambda: grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 6), torch.tensor([0, 4, 2])), ValueError,
         "offsets must start at 0, never decrease"),
        (lambda: grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 6), torch.tensor([1, 2, 5])), ValueError,
         "offsets must start at 0"),
        (lambda: grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 6), torch.tensor([0, 2, 6])), ValueError,
         "offsets must"),
        (lambda: grouped_mm(torch.randn(5, 3).double(), torch.randn(2, 3, 6).double(), torch.tensor([0, 2, 5]),
                            backend="triton"), TypeError, "backend='triton' supports"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- the ranking an exported graph uses --------------------------------------------------------


def test_export_ranking_equals_the_stable_sort_with_ties_nan_and_signed_zeros():
    """ONNX has no stable sort, so under torch.export ``route`` ranks experts by pairwise
    comparisons; it must pick what the stable descending sort picks, ties, NaN (either sign,
    ranked above every number), -0.0 against 0.0 and infinities included."""
    from gatezoo.kernels.routing.naive import _topk_by_rank

    gen = torch.Generator().manual_seed(0)
    for num in (1, 2, 5, 9):
        s = torch.randint(-2, 3, (200, num), generator=gen).float()  # many exact ties
        for value, p in ((float("nan"), 0.08), (-float("nan"), 0.08), (-0.0, 0.1), (float("inf"), 0.05),
                         (-float("inf"), 0.05)):
            s[torch.rand(200, num, generator=gen) < p] = value
        for k in range(1, num + 1):
            ref = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
            assert torch.equal(_topk_by_rank(s, k), ref), (num, k)


def test_route_under_export_picks_what_it_picks_eagerly(monkeypatch):
    logits = torch.randint(-1, 2, (30, 6)).float()  # ties everywhere
    bias = torch.tensor([0.0, 0.5, 0.0, 0.0, -0.5, 0.0])
    eager = route(logits, 3, bias=bias, backend="torch")
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    exported = route(logits, 3, bias=bias)
    assert torch.equal(exported.indices, eager.indices) and torch.equal(exported.counts, eager.counts)
    assert_close("weights", eager.weights.double(), exported.weights, TOL[torch.float32])
