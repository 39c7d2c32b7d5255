"""gated_act / glu / glu_packed: Triton and torch paths against a float64 oracle."""

import pytest
import torch
from closeness import TOL, assert_close
from test_nonfinite import dphi_ref, phi_ref  # the float64 values of the math (docs/activation.md)

from gatezoo.kernels import KINDS, gated_act, glu, glu_packed
from gatezoo.kernels.activation.naive import phi_composed

CASES = [(k, a) for k, spec in KINDS.items() for a in ([None, 0.3] if spec.takes_alpha else [None])]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ["torch", "triton"]


def _case_id(case):
    kind, alpha = case
    return kind if alpha is None else f"x{kind}"


def _fresh(shape, layout, dtype):
    """Random non-zero input of ``shape`` (rounded to ``dtype``) in the given memory layout."""
    if layout == "transposed":  # last dim not contiguous
        return torch.randn(shape[::-1], dtype=torch.float64).to(dtype).permute(*reversed(range(len(shape))))
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _leaf(t, layout):
    """(leaf, input): the input handed to the op in ``layout``, and the leaf it is a view of.
    "rowstride" puts the rows inside a wider buffer, so the last dim is contiguous but the row
    stride is not the row length (what glu_packed's halves look like)."""
    if layout != "rowstride":
        leaf = t.detach().clone().requires_grad_()  # clone keeps a transposed layout
        return leaf, leaf
    wide = torch.zeros(t.shape[:-1] + (t.shape[-1] + 7,), dtype=t.dtype)
    wide[..., 3 : 3 + t.shape[-1]] = t
    wide.requires_grad_()
    view = wide[..., 3 : 3 + t.shape[-1]]
    assert not view.is_contiguous() and view.stride(-1) == 1
    return wide, view


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


def _run(op, inputs, kind, alpha, backend, layout="contig"):
    """Forward through gatezoo; returns (y, tensors to differentiate with respect to, alpha)."""
    leaves = [_leaf(t, layout)[1] for t in inputs]
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
    y, leaves, al = _run(op, inputs, kind, alpha, backend, layout)
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
def test_extreme_inputs(case, backend):
    """Huge, tiny and zero pre-activations: finite, and equal to float64 values computed from the
    math with Python's math module (not from PyTorch's kernels, whose far tails may differ
    between instruction sets)."""
    kind, alpha = case
    a_vals = [-1e4, -80.0, -5.0, -1e-30, 0.0, 1e-30, 5.0, 80.0, 1e4]
    a = torch.tensor([a_vals])
    b = torch.linspace(-1.0, 1.0, 9).reshape(1, 9)
    y, leaves, al = _run("glu", [a, b], kind, alpha, backend)
    dy = torch.full_like(y, 0.5)
    grads = torch.autograd.grad(y, leaves, dy)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    x32 = a.double().flatten().tolist()  # the float32 inputs, exactly
    b32 = b.double().flatten().tolist()
    phi = [phi_ref(kind, alpha, x) for x in x32]
    ref = lambda vals: torch.tensor([vals], dtype=torch.float64)  # noqa: E731
    assert_close("y", ref([p * v for p, v in zip(phi, b32)]), y, 1e-5)
    assert_close("da", ref([0.5 * v * dphi_ref(kind, alpha, x) for x, v in zip(x32, b32)]), grads[0], 1e-5)
    assert_close("db", ref([0.5 * p for p in phi]), grads[1], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_for_a_subset_of_inputs(backend):
    """Only b, or only alpha, requiring a gradient still gives the right gradient."""
    a, b, dy = torch.randn(6, 13), torch.randn(6, 13), torch.randn(6, 13)
    al_ref = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    b_ref = b.double().requires_grad_()
    y_ref = phi_composed(a.double(), KINDS["silu"], al_ref) * b_ref
    db_ref, dal_ref = torch.autograd.grad(y_ref, [b_ref, al_ref], dy.double())
    bb = b.clone().requires_grad_()
    (db,) = torch.autograd.grad(glu(a, bb, "silu", 0.2, backend=backend), [bb], dy)
    assert_close("db", db_ref, db, 1e-5)
    al = torch.tensor(0.2, requires_grad=True)
    (dal,) = torch.autograd.grad(glu(a, b, "silu", al, backend=backend), [al], dy)
    assert_close("dalpha", dal_ref, dal, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["gated_act", "glu", "glu_packed"])
def test_second_order_gradients(op, backend):
    """create_graph=True (gradient penalties, Hessian-vector products) gives exact second-order
    gradients, alpha included."""
    inputs = _inputs(op, "contig", torch.float64)
    y_ref, leaves_ref, al_ref = _oracle(op, inputs, "silu", 0.3)
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    al = torch.tensor(0.3, requires_grad=True)
    if op == "gated_act":
        y = gated_act(leaves[0], "silu", al, backend=backend)
    elif op == "glu":
        y = glu(leaves[0], leaves[1], "silu", al, backend=backend)
    else:
        y = glu_packed(leaves[0], "silu", al, backend=backend)
    for out, wrt in ((y_ref, leaves_ref + [al_ref]), (y, leaves + [al])):
        g = torch.autograd.grad((out + wrt[0].sum()).square().sum(), wrt[0], create_graph=True)[0]
        g.square().sum().backward()
    for t_ref, t in zip(leaves_ref + [al_ref], leaves + [al]):
        assert_close("second-order grad", t_ref.grad, t.grad, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(50, 45), (3, 200)], ids=["row-chunks", "column-chunks"])
@pytest.mark.parametrize("op", ["gated_act", "glu", "glu_packed"])
def test_chunked_torch_path_crosses_chunks(monkeypatch, op, shape, dtype):
    """Force many small chunks (whole rows, or pieces of rows wider than a chunk) so the chunk
    loop, the float32 scratch copies and the dalpha accumulation are exercised."""
    from gatezoo.kernels.activation import torch_path

    monkeypatch.setattr(torch_path, "CPU_CHUNK_ELEMENTS", 64)
    packed_shape = shape[:-1] + (2 * shape[-1],)
    n_in = 2 if op == "glu" else 1
    inputs = [torch.randn(packed_shape if op == "glu_packed" else shape).to(dtype) for _ in range(n_in)]
    for kind, alpha in CASES:
        y_ref, leaves_ref, al_ref = _oracle(op, inputs, kind, alpha)
        y, leaves, al = _run(op, inputs, kind, alpha, "torch")
        assert_close(kind, y_ref, y, TOL[dtype])
        dy = torch.randn(y.shape).to(dtype)
        wrt_ref = leaves_ref + ([al_ref] if al_ref is not None else [])
        wrt = leaves + ([al] if al is not None else [])
        for g_ref, g in zip(torch.autograd.grad(y_ref, wrt_ref, dy.double()), torch.autograd.grad(y, wrt, dy)):
            assert_close(kind + " grad", g_ref, g, TOL[dtype])
