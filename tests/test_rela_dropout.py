"""Attention-weight dropout of rela_attention: one mask on every path, regenerated from the seed.

The torch path (in every chunking), the Triton kernels (through the interpreter) and the naive
composition must drop the same weights for the same seed, so their outputs and gradients are
compared with each other and with the float64 composition at p = 0.1, as without dropout.
"""

import math

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.kernels.rela import rela_attention, rela_composed
from gatezoo.kernels.rela.dropout import keep_weights, mix32, threshold

P = 0.1
SEED = 2**31 + 12345  # above 2**31: the kernels get its bits as a negative int32

# (B, H, Hk, Tq, Tk, D, causal, padding): tiny odd shapes, several interpreter tiles (16) in some
SHAPES = [
    (2, 3, 3, 7, 7, 16, False, False),
    (2, 4, 2, 5, 9, 24, True, True),  # GQA, decoding-style causal (Tq < Tk), padding
    (1, 3, 1, 19, 21, 16, True, False),  # MQA, causal, two key tiles
    (2, 2, 2, 17, 11, 8, False, True),  # padding, two query tiles
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHUNKINGS = {  # module settings of the torch path (see test_rela_kernels.py)
    "default": {},
    "row-chunks": {"CPU_CHUNK_SCORES": 48, "PAR_HEADS": 2, "CAUSAL_ROWS": 3, "DQ_K": 2},
    "many-chunks": {"CPU_CHUNK_SCORES": 8, "PAR_HEADS": 1, "CAUSAL_ROWS": 2},
}


def _id(s):
    b, h, hk, tq, tk, d, causal, pad = s
    return f"B{b}-H{h}-Hk{hk}-Tq{tq}-Tk{tk}-D{d}" + ("-causal" if causal else "") + ("-pad" if pad else "")


def _inputs(shape, dtype):
    b, h, hk, tq, tk, d, causal, pad = shape
    q, k, v = (torch.randn(b, n, t, d).to(dtype) for n, t in ((h, tq), (hk, tk), (hk, tk)))
    mask = None
    if pad:
        mask = torch.rand(b, tk) > 0.3
        mask[:, 0] = True
    return q, k, v, mask


def _run(q, k, v, do, **kwargs):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = rela_attention(*ins, **kwargs)
    return [out, *torch.autograd.grad(out, ins, do)]


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[_id(s) for s in SHAPES])
def test_paths_agree_with_dropout(shape, dtype, chunking, monkeypatch):
    """Output and dQ/dK/dV of the torch path and the Triton kernels at p = 0.1 against the
    float64 composition with the same seed, and against each other."""
    from gatezoo.kernels.rela import torch_path

    for name, value in CHUNKINGS[chunking].items():
        monkeypatch.setattr(torch_path, name, value)
    causal = shape[6]
    q, k, v, mask = _inputs(shape, dtype)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rela_composed(*ref_in, causal, mask, None, P, SEED)
    do = torch.randn(ref.shape).to(dtype)
    ref_all = [ref, *torch.autograd.grad(ref, ref_in, do.double())]
    kwargs = dict(causal=causal, key_padding_mask=mask, dropout_p=P, dropout_seed=SEED)
    backends = ("torch", "triton") if chunking == "default" else ("torch",)
    results = {b: _run(q, k, v, do, backend=b, **kwargs) for b in backends}
    for backend, res in results.items():
        for name, r, t in zip(("o", "dq", "dk", "dv"), ref_all, res):
            assert t.dtype == dtype
            assert_close(f"{backend} {name}", r, t, TOL[dtype])
    if "triton" in results:
        for name, a, b in zip(("o", "dq", "dk", "dv"), results["torch"], results["triton"]):
            assert_close(f"triton vs torch {name}", a, b, TOL[dtype])
    # dropout changed the result: the comparisons above are not of the undropped attention
    plain = rela_composed(*ref_in, causal, mask)
    assert (plain - ref).abs().max() > 1e-3


def _weights(backend, b, h, hk, tq, tk, p, seed, causal=False, dtype=torch.float32):
    """The dropped-out weight matrices A (B, H, Tq, Tk) an op computes, read through the op itself:
    q = k = 1 makes every score scale * D > 0 and v = the identity (D = Tk) makes O = A."""
    q = torch.ones(b, h, tq, tk, dtype=dtype)
    k = torch.ones(b, hk, tk, tk, dtype=dtype)
    v = torch.eye(tk, dtype=dtype).expand(b, hk, tk, tk)
    if backend == "naive":
        return rela_composed(q, k, v, causal, None, 1.0, p, seed)
    return rela_attention(q, k, v, causal=causal, scale=1.0, dropout_p=p, dropout_seed=seed, backend=backend)


@pytest.mark.parametrize("causal", [False, True])
def test_every_path_drops_the_same_weights(causal):
    """The kept/dropped pattern itself, read from each path, is identical, and the kept weights
    are scaled by 1/(1 - p)."""
    p = 0.3
    w = {backend: _weights(backend, 2, 4, 2, 23, 37, p, SEED, causal) for backend in ("naive", "torch", "triton")}
    kept = {name: a != 0 for name, a in w.items()}
    assert torch.equal(kept["naive"], kept["torch"]) and torch.equal(kept["naive"], kept["triton"])
    expect = torch.full_like(w["naive"], 37.0 / (1 - p))  # score = scale * D = 37
    for name, a in w.items():
        assert_close(name, torch.where(kept[name], expect, 0.0), a, 1e-6)
    # the mask is the documented hash: kept where keep_weights says, within the causal mask
    bh = torch.arange(8).view(2, 4, 1, 1)
    hashed = keep_weights(SEED, bh, torch.arange(23)[:, None], torch.arange(37), p)
    if causal:
        hashed &= torch.ones(23, 37, dtype=torch.bool).tril(37 - 23)
    assert torch.equal(kept["naive"], hashed)


def test_keep_rate_and_independence():
    """Over 2**21 weights the keep rate is within 4 standard deviations of 1 - p, as are the rate
    at which neighbouring keys are both kept, (1 - p)**2, and the agreement of two heads' masks."""
    p = P
    kept = _weights("torch", 2, 4, 4, 256, 256, p, 7) != 0
    n = kept.numel()

    def within(rate, expected, count):
        sd = math.sqrt(expected * (1 - expected) / count)
        assert abs(rate - expected) < 4 * sd, (rate, expected, sd)

    within(kept.double().mean().item(), 1 - p, n)
    pairs = kept[..., 1:] & kept[..., :-1]
    within(pairs.double().mean().item(), (1 - p) ** 2, pairs.numel())
    same = kept[:, 0] == kept[:, 1]
    within(same.double().mean().item(), p * p + (1 - p) ** 2, same.numel())
    # per query row and per key column the rates stay near 1 - p too (no striped masks)
    for rates, count in ((kept.double().mean(-1), 256), (kept.double().mean(-2), 256)):
        sd = math.sqrt(p * (1 - p) / count)
        assert (rates - (1 - p)).abs().max() < 6 * sd


def test_seeds_choose_the_mask():
    """The same seed gives the same mask; other seeds (and other heads) give other masks; with no
    seed one is drawn from torch's generator, so torch.manual_seed repeats it."""
    a = _weights("torch", 1, 2, 2, 16, 16, 0.5, 1) != 0
    assert torch.equal(a, _weights("torch", 1, 2, 2, 16, 16, 0.5, 1) != 0)
    for seed in (2, 2**31, 2**32 - 1):
        assert not torch.equal(a, _weights("torch", 1, 2, 2, 16, 16, 0.5, seed) != 0)
    assert not torch.equal(a[0, 0], a[0, 1])
    torch.manual_seed(5)
    drawn = _weights("torch", 1, 2, 2, 16, 16, 0.5, None) != 0
    again = _weights("torch", 1, 2, 2, 16, 16, 0.5, None) != 0
    torch.manual_seed(5)
    assert torch.equal(drawn, _weights("torch", 1, 2, 2, 16, 16, 0.5, None) != 0)
    assert not torch.equal(drawn, again)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_rate_is_the_computation_without_dropout(backend):
    """dropout_p = 0 (with or without a seed) is bit for bit the call without dropout."""
    q, k, v, mask = _inputs((2, 4, 2, 9, 13, 16, True, True), torch.float32)
    do = torch.randn(2, 4, 9, 16)
    base = _run(q, k, v, do, causal=True, key_padding_mask=mask, backend=backend)
    for kwargs in ({"dropout_p": 0.0}, {"dropout_p": 0, "dropout_seed": 3}):
        again = _run(q, k, v, do, causal=True, key_padding_mask=mask, backend=backend, **kwargs)
        for a, b in zip(base, again):
            assert torch.equal(a, b)


def test_saves_no_quadratic_tensor_with_dropout():
    """Backward regenerates the mask from the seed: only q, k, v are saved."""
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        rela_attention(q, k, v, causal=True, dropout_p=P, dropout_seed=1, backend="torch")
    assert sum(saved) == 3 * q.numel()


def test_gradcheck_with_dropout():
    q = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: rela_attention(q, k, v, causal=True, key_padding_mask=mask, dropout_p=0.3,
                                       dropout_seed=9, backend="torch"), (q, k, v))


def test_second_order_gradients_with_dropout():
    """The create_graph fallback differentiates the composition with the same mask."""
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    for fn, ins in ((lambda *a: rela_composed(*a, True, None, None, 0.3, 4), ref_in),
                    (lambda *a: rela_attention(*a, causal=True, dropout_p=0.3, dropout_seed=4, backend="torch"),
                     [q, k, v])):
        (gq,) = torch.autograd.grad(fn(*ins).square().sum(), ins[0], create_graph=True)
        gq.square().sum().backward()
    for t_ref, t in zip(ref_in, (q, k, v)):
        assert_close("second order", t_ref.grad, t.grad, 1e-10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropped_non_finite_weights_give_zero(backend):
    """A dropped weight is selected out: an infinite weight that dropout drops contributes 0 to
    its row (not inf * 0 = NaN), on every path."""
    p, seed = 0.5, 11
    kept = _weights("naive", 1, 1, 1, 6, 8, p, seed) != 0
    row = int(torch.nonzero(~kept[0, 0, :, 3])[0, 0])  # a query whose weight of key 3 is dropped
    q, k, v = (torch.randn(1, 1, n, 8) for n in (6, 8, 8))
    q[..., 0] = q[..., 0].abs() + 0.1
    k[0, 0, 3, 0] = float("inf")  # every query scores +inf on key 3
    out = rela_attention(q, k, v, dropout_p=p, dropout_seed=seed, backend=backend)
    ref = rela_composed(q.double(), k.double(), v.double(), False, None, None, p, seed)
    assert torch.isfinite(ref[0, 0, row]).all() and not torch.isfinite(ref).all()
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref).all(-1)
    assert_close("finite rows", ref[finite], out[finite], 1e-5)


def test_compiled_composition_uses_the_same_mask():
    """Under torch.compile the composition runs, with the same hash; an unseeded call compiles
    without a graph break (the seed is drawn as a tensor inside the trace)."""
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    eager = rela_attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=SEED, backend="torch")
    fn = torch.compile(lambda q, k, v, seed: rela_attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=seed),
                       backend="aot_eager", fullgraph=True)
    assert_close("compiled", eager, fn(q, k, v, SEED), 1e-6)
    drawn = fn(q, k, v, None)
    assert drawn.shape == q.shape and torch.isfinite(drawn).all()


def test_hash_is_the_documented_mixer():
    """mix32 is lowbias32 mod 2**32 (checked against plain Python ints), and threshold is
    floor(p * 2**32)."""
    def ref(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    xs = [0, 1, 12345, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]
    assert threshold(0.1) == math.floor(0.1 * 2**32) and threshold(0.0) == 0


@pytest.mark.parametrize("value, exc", [
    (1.0, ValueError), (1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
    (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError), (None, TypeError),
    (torch.tensor(0.1), TypeError),
])
def test_bad_dropout_p(value, exc):
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(exc, match="dropout_p"):
        rela_attention(q, q, q, dropout_p=value)


@pytest.mark.parametrize("value, exc", [
    (-1, ValueError), (2**32, ValueError), (1.5, TypeError), ("3", TypeError), (True, TypeError),
])
def test_bad_dropout_seed(value, exc):
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(exc, match="dropout_seed"):
        rela_attention(q, q, q, dropout_p=0.1, dropout_seed=value)
