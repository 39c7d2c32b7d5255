"""rela_attention (torch path and Triton kernels) against a float64 oracle."""

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.kernels.rela import rela_attention, rela_composed

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (B, H, Hk, Tq, Tk, D, causal, padding)
SHAPES = [
    (2, 3, 3, 7, 7, 16, False, False),
    (2, 4, 2, 5, 9, 40, True, True),  # GQA, decoding-style causal (Tq < Tk), padding
    (1, 2, 1, 9, 9, 64, True, False),  # MQA, causal
    (2, 2, 2, 6, 11, 40, False, True),
    (1, 2, 2, 9, 4, 16, True, False),  # Tq > Tk: the first queries see no key at all
]


def _id(s):
    b, h, hk, tq, tk, d, causal, pad = s
    return f"B{b}-H{h}-Hk{hk}-Tq{tq}-Tk{tk}-D{d}" + ("-causal" if causal else "") + ("-pad" if pad else "")


def _inputs(shape, dtype, layout):
    b, h, hk, tq, tk, d, causal, pad = shape
    if layout == "transposed":  # (B, T, H, D) storage, as a fused projection produces
        q = torch.randn(b, tq, h, d).to(dtype).transpose(1, 2)
        k = torch.randn(b, tk, hk, d).to(dtype).transpose(1, 2)
        v = torch.randn(b, tk, hk, d).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, n, t, d).to(dtype) for n, t in ((h, tq), (hk, tk), (hk, tk)))
    mask = None
    if pad:
        mask = torch.rand(b, tk) > 0.3
        mask[0] = False  # a fully padded sequence: its queries get 0, not NaN
        mask[-1, 0] = True
    return q, k, v, mask


TRITON_SHAPES = SHAPES + [
    (1, 2, 2, 37, 21, 24, False, True),  # several query and key tiles (the interpreter uses 16)
    (1, 1, 1, 20, 20, 200, True, False),  # D masked up to 256
    (1, 4, 2, 35, 50, 16, True, True),  # causal Tq < Tk with GQA across several tiles
    (1, 3, 1, 41, 18, 16, True, False),  # causal Tq > Tk with MQA across several tiles
]


@pytest.mark.parametrize("layout", ["contig", "transposed"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=[_id(s) for s in TRITON_SHAPES])
def test_triton_matches_float64_and_torch(shape, dtype, layout):
    """Triton (through the interpreter) against the float64 oracle and the torch path."""
    causal = shape[6]
    q, k, v, mask = _inputs(shape, dtype, layout)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rela_composed(*ref_in, causal, mask)
    do = torch.randn(ref.shape).to(dtype)
    grads_ref = torch.autograd.grad(ref, ref_in, do.double())
    results = {}
    for backend in ("triton", "torch"):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = rela_attention(*ins, causal=causal, key_padding_mask=mask, backend=backend)
        results[backend] = [out, *torch.autograd.grad(out, ins, do)]
    for name, r, t, t_ref in zip(("o", "dq", "dk", "dv"), [ref, *grads_ref], results["triton"], results["torch"]):
        assert t.dtype == dtype
        assert_close(name, r, t, TOL[dtype])
        assert_close(name + " vs torch", t_ref, t, TOL[dtype])


# CPU chunking of the torch path: module settings patched for the test
CHUNKINGS = {
    "one-chunk": {},
    "split-dq": {"DQ_K": 3},  # whole rows, dq^T summed over 3 key rows at a time
    # a few rows of two heads: outputs go through buffers, dq^T in slices of 2 key rows
    "row-chunks": {"CPU_CHUNK_SCORES": 48, "PAR_HEADS": 2, "CAUSAL_ROWS": 3, "DQ_K": 2},
    # one key head and one row a chunk
    "many-chunks": {"CPU_CHUNK_SCORES": 8, "PAR_HEADS": 1, "CAUSAL_ROWS": 2},
}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("layout", ["contig", "transposed"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[_id(s) for s in SHAPES])
def test_torch_path_matches_float64(shape, dtype, layout, chunking, monkeypatch):
    from gatezoo.kernels.rela import torch_path

    for name, value in CHUNKINGS[chunking].items():
        monkeypatch.setattr(torch_path, name, value)
    causal = shape[6]
    q, k, v, mask = _inputs(shape, dtype, layout)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rela_composed(*ref_in, causal, mask)
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = rela_attention(*ins, causal=causal, key_padding_mask=mask, backend="torch")
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close("o", ref, out, TOL[dtype])
    do = torch.randn(out.shape).to(dtype)
    for name, g_ref, g in zip(("dq", "dk", "dv"), torch.autograd.grad(ref, ref_in, do.double()),
                              torch.autograd.grad(out, ins, do)):
        assert g.dtype == dtype
        assert_close(name, g_ref, g, TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_masked_rows_are_zero(backend):
    q, k, v = (torch.randn(2, 2, 5, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = rela_attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_gradcheck_torch_path():
    q = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: rela_attention(q, k, v, causal=True, key_padding_mask=mask, backend="torch"), (q, k, v))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_order_gradients(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for fn, ins in ((lambda *a: rela_composed(*a, True), ref_in),
                    (lambda *a: rela_attention(*a, causal=True, backend=backend), [q, k, v])):
        (gq,) = torch.autograd.grad(fn(*ins).square().sum(), ins[0], create_graph=True)
        gq.square().sum().backward()
    for t_ref, t in zip(ref_in, (q, k, v)):
        assert_close("second order", t_ref.grad, t.grad, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_per_head_path_writes_the_block_layout_and_equals_the_chunked_path(causal, monkeypatch):
    """Short float32 sequences with one query head per key head go head by head: the output and
    the gradients come in (B, T, H, D) storage (joining the heads is then a view), with the
    values of the chunked path."""
    from gatezoo.kernels.rela import torch_path

    q, k, v, mask = _inputs((2, 3, 3, 7, 9, 16, causal, True), torch.float32, "transposed")
    do = torch.randn(2, 3, 7, 16)
    results = []
    for budget in (torch_path.CPU_CHUNK_SCORES, 8):  # the per-head path, then the chunked one
        monkeypatch.setattr(torch_path, "CPU_CHUNK_SCORES", budget)
        assert torch_path._per_head_ok(q, k, v, causal) == (budget != 8)
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = rela_attention(*ins, causal=causal, key_padding_mask=mask, backend="torch")
        results.append([out, *torch.autograd.grad(out, ins, do)])
    for t in results[0]:
        assert t.transpose(1, 2).is_contiguous()
    for name, a, b in zip(("o", "dq", "dk", "dv"), *results):
        assert_close(name, b, a, 1e-6)


def test_cpu_chunk_plan():
    """Whole score rows for two heads where they fit in the budget, fewer rows when they do not,
    and short row chunks for causal attention so the masked half is skipped."""
    from gatezoo.kernels.rela import torch_path

    cpu = torch.device("cpu")
    budget = torch_path.CPU_CHUNK_SCORES
    assert torch_path._plan(32, 1024, 1024, False, cpu) == (2, 1024)
    assert torch_path._plan(32, 256, 256, False, cpu) == (32, 256)
    heads, rows = torch_path._plan(32, 4096, 4096, False, cpu)
    assert heads == 2 and rows < 4096 and heads * rows * 4096 <= budget
    assert torch_path._plan(32, 1024, 1024, True, cpu)[1] == torch_path.CAUSAL_ROWS
    assert torch_path._plan(1, 1 << 22, 1 << 22, False, cpu) == (1, 1)  # never an empty chunk
    assert torch_path._plan(32, 4096, 4096, False, torch.device("meta")) == (32, 4096)  # one chunk off CPU


def test_saves_no_quadratic_tensor():
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        rela_attention(q, k, v, causal=True)
    assert sum(saved) == 3 * q.numel()


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (((2, 2, 4, 8), (2, 2, 4), (2, 2, 4, 8)), {}, ValueError, "k must have shape"),
        (((2, 3, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8)), {}, ValueError, "must divide q heads"),
        (((2, 2, 4, 8), (3, 2, 4, 8), (3, 2, 4, 8)), {}, ValueError, "batch 2"),
        (((2, 2, 4, 8), (2, 2, 4, 6), (2, 2, 4, 6)), {}, ValueError, "head_dim 8"),
        (((2, 2, 4, 8), (2, 2, 4, 8), (2, 2, 5, 8)), {}, ValueError, "k and v must have the same shape"),
        (((1, 1, 2, 300), (1, 1, 2, 300), (1, 1, 2, 300)), {}, ValueError, "at most 256"),
        (((2, 2, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8)), {"key_padding_mask": torch.ones(2, 4)}, TypeError, "bool"),
        (((2, 2, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8)), {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)},
         ValueError, r"\(batch, key_len\)"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    q, k, v = (torch.randn(s) for s in args)
    with pytest.raises(exc, match=match):
        rela_attention(q, k, v, **kwargs)


def test_mixed_dtypes_rejected():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError, match="share a dtype"):
        rela_attention(q, q.half(), q)




@pytest.mark.parametrize("causal", [False, True])
def test_triton_skips_padding_tiles_correctly(causal):
    """Right-padded sequences (the usual batch layout) whose padding spans whole key tiles,
    which the kernels skip: outputs and gradients still match the oracle."""
    q, k, v = (torch.randn(3, 2, 45, 16) for _ in range(3))
    lengths = torch.tensor([45, 12, 30])
    mask = torch.arange(45)[None, :] < lengths[:, None]
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rela_composed(*ref_in, causal, mask)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = rela_attention(*ins, causal=causal, key_padding_mask=mask, backend="triton")
    do = torch.randn(out.shape)
    assert_close("o", ref, out, 1e-4)
    grads = torch.autograd.grad(out, ins, do)
    for name, g_ref, g in zip(("dq", "dk", "dv"), torch.autograd.grad(ref, ref_in, do.double()), grads):
        assert_close(name, g_ref, g, 1e-4)
    # padded keys get exactly zero gradient
    assert torch.equal(grads[1][1, :, 12:], torch.zeros_like(grads[1][1, :, 12:]))
    assert torch.equal(grads[2][1, :, 12:], torch.zeros_like(grads[2][1, :, 12:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_padded_keys_do_not_leak(backend):
    """A padded key's score is selected out, not multiplied by 0: an inf key there must not
    turn into NaN (inf * 0) in the output."""
    q, k, v = (torch.randn(1, 1, 3, 8) for _ in range(3))
    k[0, 0, 2] = float("inf")
    mask = torch.tensor([[True, True, False]])
    out = rela_attention(q, k, v, key_padding_mask=mask, backend=backend)
    ref = rela_composed(q, k[:, :, :2], v[:, :, :2])
    assert_close("o", ref, out, 1e-5)
