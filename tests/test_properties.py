"""Property-based tests (hypothesis) of every public kernel: random valid shapes, dtypes and
strides run on the torch path and on the Triton interpreter, which must agree and stay finite
for finite input; random invalid arguments must raise ValueError or TypeError naming the
argument (never another exception, a hang or a NaN). The GLU family has its own property test
(tests/test_activation_properties.py)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatezoo.kernels import (
    KINDS,
    gated_act,
    gated_rms_norm,
    glu_packed,
    grouped_mm,
    make_plan,
    permute,
    rela_attention,
    rms_norm,
    route,
    token_mixing,
    unpermute,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"fp32": (torch.float32, 1e-4), "fp16": (torch.float16, 2e-2)}  # float64 has no Triton path


def _tensor(g, shape, dtype, layout):
    """A random tensor of ``shape`` in one of three layouts: contiguous, a transposed view (its last
    two dims swapped in memory) or a strided slice of a wider tensor."""
    if layout == "transposed" and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    elif layout == "sliced":
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    else:
        t = torch.randn(*shape, generator=g)
    return t.to(dtype)


def _agree(y_torch, y_triton, tol):
    assert y_torch.shape == y_triton.shape and y_torch.dtype == y_triton.dtype
    assert torch.isfinite(y_torch).all() and torch.isfinite(y_triton).all()
    scale = max(float(y_torch.double().abs().max()), 1.0) if y_torch.numel() else 1.0
    if y_torch.numel():
        assert float((y_torch.double() - y_triton.double()).abs().max()) <= tol * scale * 10


def _backends(fn, dtype):
    return fn("torch"), fn("triton")


common = dict(
    dtype=st.sampled_from(sorted(DTYPES)),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)


# ---------------------------------------------------------------------------------------------
# valid inputs: both paths agree and stay finite


@SETTINGS
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=2), width=st.integers(1, 40), gated=st.booleans(),
       **common)
def test_rms_norms(rows, width, gated, dtype, layout, seed):
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    x = _tensor(g, [*rows, width], dt, layout)
    w, u = torch.randn(width, generator=g).to(dt), torch.randn(width, generator=g).to(dt)
    fn = (lambda be: gated_rms_norm(x, w, u, backend=be)) if gated else (lambda be: rms_norm(x, w, backend=be))
    _agree(*_backends(fn, dt), tol)


@SETTINGS
@given(rows=st.lists(st.integers(1, 4), min_size=1, max_size=2), half=st.integers(1, 24),
       kind=st.sampled_from(sorted(KINDS)), **common)
def test_gated_act(rows, half, kind, dtype, layout, seed):
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    x = _tensor(g, [*rows, 2 * half], dt, layout)
    _agree(*_backends(lambda be: gated_act(x, kind, backend=be), dt), tol)


@SETTINGS
@given(b=st.integers(1, 2), hk=st.integers(1, 2), group=st.integers(1, 2), tq=st.integers(1, 9),
       tk=st.integers(1, 9), d=st.integers(1, 20), causal=st.booleans(), masked=st.booleans(), **common)
def test_rela_attention(b, hk, group, tq, tk, d, causal, masked, dtype, layout, seed):
    dt, tol = DTYPES[dtype]
    if dt == torch.float32:
        tol = 2e-3  # the Triton path may multiply float32 as TF32 on a GPU; the interpreter does not
    g = torch.Generator().manual_seed(seed)
    q = _tensor(g, [b, hk * group, tq, d], dt, layout)
    k, v = _tensor(g, [b, hk, tk, d], dt, layout), _tensor(g, [b, hk, tk, d], dt, "contiguous")
    mask = torch.rand(b, tk, generator=g) > 0.3 if masked else None
    _agree(*_backends(lambda be: rela_attention(q, k, v, causal=causal, key_padding_mask=mask, backend=be), dt), tol)


@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(1, 12), c=st.integers(1, 10), hidden=st.integers(1, 16),
       bias=st.booleans(), extras=st.booleans(), **common)
def test_token_mixing(b, n, c, hidden, bias, extras, dtype, layout, seed):
    dt, tol = DTYPES[dtype]
    if dt == torch.float32:
        tol = 2e-3
    g = torch.Generator().manual_seed(seed)
    x = _tensor(g, [b, n, c], dt, layout)
    w1, w2 = (torch.randn(hidden, n, generator=g) / math.sqrt(n)).to(dt), torch.randn(n, hidden, generator=g).to(dt)
    b1 = torch.randn(hidden, generator=g).to(dt) if bias else None
    b2 = torch.randn(n, generator=g).to(dt) if bias else None
    res = _tensor(g, [b, n, c], dt, "contiguous") if extras else None
    gate = _tensor(g, [b, n, c], dt, "sliced") if extras else None
    _agree(*_backends(lambda be: token_mixing(x, w1, b1, w2, b2, residual=res, gate=gate, backend=be), dt), tol)


@SETTINGS
@given(tokens=st.integers(1, 30), experts=st.integers(1, 9), k=st.integers(1, 9), width=st.integers(1, 12),
       out=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_routing_pipeline(tokens, experts, k, width, out, seed):
    k = min(k, experts)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    x = torch.randn(tokens, width, generator=g)
    weight = torch.randn(experts, width, out, generator=g)
    results = []
    for be in ("torch", "triton"):
        r = route(logits, k, backend=be)
        plan = make_plan(r.indices, experts)
        xs = permute(x, plan, backend=be)
        ys = grouped_mm(xs, weight, plan.offsets, backend=be)
        results.append((r, unpermute(ys, r.weights, plan, backend=be)))
    (r0, y0), (r1, y1) = results
    assert torch.equal(r0.indices, r1.indices) and torch.equal(r0.counts, r1.counts)
    _agree(r0.weights, r1.weights, 1e-5)
    _agree(y0, y1, 1e-4)
    torch.testing.assert_close(r1.weights.sum(-1), torch.ones(tokens))


# ---------------------------------------------------------------------------------------------
# invalid inputs: ValueError or TypeError naming the argument


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


NOT_A_NUMBER = st.sampled_from(["1e-6", None, [1e-6], float("nan"), -1.0, 0.0, float("inf"), object()])
BAD_TENSOR = st.sampled_from(["int", "bool", "list", "scalar", "complex"])


def _bad_tensor(kind, shape):
    return {"int": torch.ones(shape, dtype=torch.int64), "bool": torch.ones(shape, dtype=torch.bool),
            "list": [[1.0] * shape[-1]], "scalar": torch.tensor(1.0),
            "complex": torch.ones(shape, dtype=torch.complex64)}[kind]


def _raises_naming(fn, *names):
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    message = str(info.value)
    assert any(name in message for name in names), f"{type(info.value).__name__}: {message!r} names none of {names}"


@SETTINGS
@given(eps=NOT_A_NUMBER, backend=st.sampled_from(["torch", "triton"]))
def test_bad_eps(eps, backend):
    x, w = _x(3, 8), _x(8)
    if isinstance(eps, float) and eps > 0 and math.isfinite(eps):
        return
    _raises_naming(lambda: rms_norm(x, w, eps=eps, backend=backend), "eps")
    _raises_naming(lambda: gated_rms_norm(x, w, w, eps=eps, backend=backend), "eps")


@SETTINGS
@given(scale=NOT_A_NUMBER, backend=st.sampled_from(["torch", "triton"]))
def test_bad_rela_scale(scale, backend):
    if scale is None or (isinstance(scale, float) and scale > 0 and math.isfinite(scale)):
        return
    q = _x(1, 2, 3, 4)
    _raises_naming(lambda: rela_attention(q, q, q, scale=scale, backend=backend), "scale")


@SETTINGS
@given(bad=BAD_TENSOR, which=st.sampled_from(["x", "weight", "gate_weight"]),
       backend=st.sampled_from(["torch", "triton"]))
def test_bad_norm_tensors(bad, which, backend):
    args = {"x": _x(3, 8), "weight": _x(8), "gate_weight": _x(8)}
    args[which] = _bad_tensor(bad, (3, 8) if which == "x" else (8,))
    _raises_naming(lambda: gated_rms_norm(args["x"], args["weight"], args["gate_weight"], backend=backend), which)


@SETTINGS
@given(width=st.integers(1, 12).filter(lambda w: w != 8), which=st.sampled_from(["weight", "gate_weight"]))
def test_norm_weight_width(width, which):
    args = {"x": _x(3, 8), "weight": _x(8), "gate_weight": _x(8)}
    args[which] = _x(width)
    _raises_naming(lambda: gated_rms_norm(args["x"], args["weight"], args["gate_weight"]), which)


@SETTINGS
@given(bad=BAD_TENSOR, which=st.sampled_from(["q", "k", "v"]))
def test_bad_rela_tensors(bad, which):
    args = {n: _x(1, 2, 3, 4) for n in "qkv"}
    args[which] = _bad_tensor(bad, (1, 2, 3, 4))
    _raises_naming(lambda: rela_attention(args["q"], args["k"], args["v"]), which)


@SETTINGS
@given(dim=st.integers(0, 3), size=st.integers(1, 6))
def test_rela_shapes_that_do_not_fit(dim, size):
    q = _x(1, 2, 3, 4)
    shape = [1, 2, 3, 4]
    if shape[dim] == size or (dim == 1 and 2 % size == 0) or dim == 2:
        return  # these fit (grouped-query heads, any key length)
    shape[dim] = size
    k = _x(*shape)
    _raises_naming(lambda: rela_attention(q, k, k), "k", "head_dim", "heads", "batch")


@SETTINGS
@given(k=st.sampled_from([0, -1, 9, 2.5, "2", None, True]), experts=st.integers(1, 8))
def test_bad_route_k(k, experts):
    if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= experts:
        return
    _raises_naming(lambda: route(_x(4, experts), k), "k")


@SETTINGS
@given(bad=st.sampled_from(["int_logits", "1d_logits", "bias_width", "noise_shape", "int_indices",
                            "experts", "offsets"]))
def test_bad_routing_arguments(bad):
    logits = _x(5, 4)
    if bad == "int_logits":
        _raises_naming(lambda: route(torch.ones(5, 4, dtype=torch.int64), 2), "logits")
    elif bad == "1d_logits":
        _raises_naming(lambda: route(_x(4), 2), "logits")
    elif bad == "bias_width":
        _raises_naming(lambda: route(logits, 2, bias=_x(3)), "bias")
    elif bad == "noise_shape":
        _raises_naming(lambda: route(logits, 2, noise=_x(5, 3)), "noise")
    elif bad == "int_indices":
        _raises_naming(lambda: make_plan(_x(5, 2), 4), "indices")
    elif bad == "experts":
        _raises_naming(lambda: make_plan(torch.zeros(5, 2, dtype=torch.int64), 0), "num_experts")
    else:
        _raises_naming(lambda: grouped_mm(_x(5, 3), _x(4, 3, 2), torch.tensor([0, 1, 2])), "offsets")


@SETTINGS
@given(bad=BAD_TENSOR, which=st.sampled_from(["x", "w1", "w2"]))
def test_bad_token_mixing_tensors(bad, which):
    args = {"x": _x(2, 5, 3), "w1": _x(7, 5), "w2": _x(5, 7)}
    args[which] = _bad_tensor(bad, {"x": (2, 5, 3), "w1": (7, 5), "w2": (5, 7)}[which])
    _raises_naming(lambda: token_mixing(args["x"], args["w1"], None, args["w2"], None), which)


@SETTINGS
@given(kind=st.sampled_from(["nope", "", "SILU", 3, None]), odd=st.booleans())
def test_bad_gated_act(kind, odd):
    x = _x(3, 7 if odd else 8)
    _raises_naming(lambda: gated_act(x, kind), "kind")
    if odd:  # the packed GLU splits the last dimension in two halves
        _raises_naming(lambda: glu_packed(x, "silu"), "x", "even", "last")
