"""gated_act / glu / glu_packed: Triton and torch paths against a float64 oracle."""

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.kernels import KINDS, gated_act, glu, glu_packed
from gatezoo.kernels.activation.reference import phi_composed

CASES = [(k, a) for k, spec in KINDS.items() for a in ([None, 0.3] if spec.takes_alpha else [None])]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ["torch", "triton"]


def _case_id(case):
    kind, alpha = case
    return kind if alpha is None else f"x{kind}"


def _fresh(shape, layout, dtype):
    """Random non-zero input of ``shape`` in the given memory layout."""
    if layout == "contig":
        t = torch.randn(shape, dtype=torch.float64)
    elif layout == "transposed":  # last dim not contiguous
        t = torch.randn(shape[::-1], dtype=torch.float64).permute(*reversed(range(len(shape))))
    else:  # "rowstride": rows padded, last dim contiguous (a slice of a wider buffer)
        t = torch.randn(shape[:-1] + (shape[-1] + 7,), dtype=torch.float64)[..., 3 : 3 + shape[-1]]
    return t.to(dtype)


def _oracle(op, inputs, kind, alpha):
    """Float64 forward and gradients through the readable composition."""
    spec = KINDS[kind]
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    al = None if alpha is None else torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    if op == "gated_act":
        y = phi_composed(leaves[0], spec, al)
    elif op == "glu":
        y = phi_composed(leaves[0], spec, al) * leaves[1]
    else:
        h = leaves[0].shape[-1] // 2
        y = phi_composed(leaves[0][..., :h], spec, al) * leaves[0][..., h:]
    return y, leaves, al


def _run(op, inputs, kind, alpha, backend):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    al = None if alpha is None else torch.tensor(alpha, requires_grad=True)
    if op == "gated_act":
        y = gated_act(leaves[0], kind, al, backend=backend)
    elif op == "glu":
        y = glu(leaves[0], leaves[1], kind, al, backend=backend)
    else:
        y = glu_packed(leaves[0], kind, al, backend=backend)
    return y, leaves, al


def _inputs(op, layout, dtype):
    shape = (3, 7, 45) if layout != "transposed" else (37, 45)
    if op == "glu_packed":
        return [_fresh(shape[:-1] + (2 * shape[-1],), layout, dtype)]
    if op == "glu":
        return [_fresh(shape, layout, dtype), _fresh(shape, layout, dtype)]
    return [_fresh(shape, layout, dtype)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contig", "transposed", "rowstride"])
@pytest.mark.parametrize("op", ["gated_act", "glu", "glu_packed"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64(case, op, layout, dtype, backend):
    kind, alpha = case
    inputs = _inputs(op, layout, dtype)
    y_ref, leaves_ref, al_ref = _oracle(op, inputs, kind, alpha)
    y, leaves, al = _run(op, inputs, kind, alpha, backend)
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = TOL[dtype]
    assert_close("y", y_ref, y, tol)
    dy = torch.randn(y.shape).to(dtype)  # the oracle sees the same rounded dy
    wrt_ref = leaves_ref + ([al_ref] if al_ref is not None else [])
    wrt = leaves + ([al] if al is not None else [])
    grads_ref = torch.autograd.grad(y_ref, wrt_ref, dy.double())
    grads = torch.autograd.grad(y, wrt, dy)
    names = ["dx"] if op != "glu" else ["da", "db"]
    for name, g_ref, g in zip(names + ["dalpha"], grads_ref, grads):
        assert g.dtype == (torch.float32 if name == "dalpha" else dtype)
        assert_close(name, g_ref, g, tol)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_torch_path(case):
    """The two backends agree with each other, not only with the oracle (fp32, GLU)."""
    kind, alpha = case
    inputs = _inputs("glu", "contig", torch.float32)
    dy = torch.randn(inputs[0].shape)
    out = {}
    for backend in BACKENDS:
        y, leaves, al = _run("glu", inputs, kind, alpha, backend)
        wrt = leaves + ([al] if al is not None else [])
        out[backend] = [y, *torch.autograd.grad(y, wrt, dy)]
    for name, t, r in zip(["y", "da", "db", "dalpha"], out["triton"], out["torch"]):
        assert_close(name, r, t, 1e-5)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_gradcheck_torch_path(case):
    kind, alpha = case
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    args = [a, b]
    al = None
    if alpha is not None:
        al = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        args.append(al)
    assert torch.autograd.gradcheck(lambda a, b, *al: glu(a, b, kind, *al, backend="torch"), args)
    assert torch.autograd.gradcheck(lambda a, *al: gated_act(a, kind, *al, backend="torch"), [a] + args[2:])
    assert torch.autograd.gradcheck(lambda x, *al: glu_packed(x, kind, *al, backend="torch"), [x] + args[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_extreme_inputs_stay_finite(case, backend):
    kind, alpha = case
    a = torch.tensor([[-1e4, -80.0, -5.0, -1e-30, 0.0, 1e-30, 5.0, 80.0, 1e4]], requires_grad=True)
    b = torch.full_like(a, 0.5).requires_grad_()
    y = glu(a, b, kind, alpha, backend=backend)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_float_alpha_and_one_element_alpha():
    a, b = torch.randn(5, 9), torch.randn(5, 9)
    ref = glu(a, b, "silu", torch.tensor(0.25))
    assert_close("float alpha", ref, glu(a, b, "silu", 0.25), 1e-6)
    al = torch.tensor([0.25], requires_grad=True)
    glu(a, b, "silu", al).sum().backward()
    assert al.grad.shape == (1,)


def test_alpha_zero_is_the_plain_activation():
    x = torch.randn(6, 11)
    for kind, spec in KINDS.items():
        if spec.takes_alpha:
            assert_close(kind, gated_act(x, kind), gated_act(x, kind, 0.0), 1e-6)
    assert_close("silu", torch.nn.functional.silu(x), gated_act(x, "silu"), 1e-6)
    assert_close("gelu", torch.nn.functional.gelu(x), gated_act(x, "gelu"), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_scalar_inputs(backend):
    assert glu(torch.randn(0, 4), torch.randn(0, 4), "silu", backend=backend).shape == (0, 4)
    assert glu_packed(torch.randn(3, 0), "gelu", backend=backend).shape == (3, 0)
    x = torch.tensor(0.7)
    assert_close("0-dim", torch.nn.functional.silu(x), gated_act(x, "silu", backend=backend), 1e-6)


def test_packed_reads_halves_in_place():
    """glu_packed saves only its packed input: one storage, no copy of the halves."""
    x = torch.randn(8, 2 * 33, requires_grad=True)
    seen = set()

    def pack(t):
        seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        glu_packed(x, "silu", backend="torch")
    assert seen == {x.untyped_storage().data_ptr()}


def test_chunked_torch_path_crosses_chunks(monkeypatch):
    """Force many small chunks so the chunk loop and the dalpha accumulation are exercised."""
    from gatezoo.kernels.activation import reference

    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMENTS", 64)
    inputs = [torch.randn(50, 45, dtype=torch.float64) for _ in range(2)]
    for kind, alpha in CASES:
        y_ref, leaves_ref, al_ref = _oracle("glu", inputs, kind, alpha)
        y, leaves, al = _run("glu", [t.float() for t in inputs], kind, alpha, "torch")
        assert_close(kind, y_ref, y, 1e-5)
        dy = torch.randn(y.shape, dtype=torch.float64)
        wrt_ref = leaves_ref + ([al_ref] if al_ref is not None else [])
        wrt = leaves + ([al] if al is not None else [])
        for g_ref, g in zip(torch.autograd.grad(y_ref, wrt_ref, dy), torch.autograd.grad(y, wrt, dy.float())):
            assert_close(kind + " grad", g_ref, g, 1e-5)
