"""token_mixing (torch and Triton paths) against a float64 oracle: output and every gradient."""

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.kernels import token_mixing
from gatezoo.kernels.mixing import token_mixing_composed
from gatezoo.kernels.mixing.torch_path import TokenMixingFunction

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = ("x", "w1", "b1", "w2", "b2", "residual", "gate")


def _inputs(b, n, c, hd, dtype, layout="contig", bias=True, residual=True, gate=True):
    if layout == "contig":
        x = torch.randn(b, n, c)
    elif layout == "transposed":  # channels-first storage, the (B, N, C) view is not contiguous
        x = torch.randn(b, c, n).transpose(1, 2)
    else:  # every other channel of a wider tensor
        x = torch.randn(b, n, 2 * c)[:, :, ::2]
    w1 = torch.randn(hd, n) * n**-0.5
    w2 = torch.randn(n, hd) * hd**-0.5
    b1 = torch.randn(hd) * 0.5 if bias else None
    b2 = torch.randn(n) * 0.5 if bias else None
    r = torch.randn(b, n, c) if residual else None
    g = torch.rand(b, n, c) + 0.5 if gate else None
    return [t if t is None else t.to(dtype) for t in (x, w1, b1, w2, b2, r, g)]


def _check(ins, backend, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    ref_in = [t if t is None else t.detach().double().requires_grad_() for t in ins]
    got_in = [t if t is None else t.detach().requires_grad_() for t in ins]  # same storage and strides
    assert got_in[0].stride() == ins[0].stride()
    ref = token_mixing_composed(*ref_in)
    out = token_mixing(*got_in[:5], residual=got_in[5], gate=got_in[6], backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close("y", ref, out, tol)
    dy = torch.randn(out.shape).to(dtype)
    used = [i for i, t in enumerate(ref_in) if t is not None]
    g_ref = torch.autograd.grad(ref, [ref_in[i] for i in used], dy.double())
    g_out = torch.autograd.grad(out, [got_in[i] for i in used], dy)
    for i, gr, go in zip(used, g_ref, g_out):
        assert go.dtype == dtype and go.shape == ins[i].shape, NAMES[i]
        assert_close("d" + NAMES[i], gr, go, tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
def test_matches_float64(backend, dtype, layout):
    torch.manual_seed(1)
    _check(_inputs(3, 13, 21, 37, dtype, layout), backend, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", [dict(bias=False, residual=False, gate=False), dict(residual=True, gate=False),
                                  dict(residual=False, gate=True), dict(bias=False)],
                         ids=["plain", "residual", "gate", "nobias"])
def test_optional_operands(backend, opts):
    torch.manual_seed(2)
    _check(_inputs(2, 9, 17, 20, torch.float32, **opts), backend, torch.float32)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 49, 33, 70), (5, 64, 3, 17), (1, 2, 40, 130)],
                         ids=["ones", "mixer28", "n64", "wide-hidden"])
def test_triton_sizes(shape):
    """Odd sizes, the full 64-token float32 tile, a hidden layer wider than one block (the
    kernels loop over hidden blocks) and the degenerate 1 x 1 x 1 case."""
    torch.manual_seed(3)
    _check(_inputs(*shape, torch.float32), "triton", torch.float32)


def test_triton_long_token_axis_half():
    """Up to 128 tokens in float16 (the half-precision tile limit)."""
    torch.manual_seed(4)
    _check(_inputs(1, 100, 16, 24, torch.float16), "triton", torch.float16)


def test_too_many_tokens_for_triton_falls_back_or_raises():
    x, w1, b1, w2, b2, _, _ = _inputs(1, 70, 5, 8, torch.float32)
    with pytest.raises(ValueError, match="at most 64"):
        token_mixing(x, w1, b1, w2, b2, backend="triton")
    ref = token_mixing_composed(x, w1, b1, w2, b2)
    assert_close("y", ref, token_mixing(x, w1, b1, w2, b2, backend="torch"), TOL[torch.float32])


def test_gradcheck_and_second_order():
    torch.manual_seed(5)
    ins = [t.double().requires_grad_() for t in _inputs(2, 5, 3, 4, torch.float64)]
    fn = lambda *a: token_mixing(*a[:5], residual=a[5], gate=a[6], backend="torch")
    assert torch.autograd.gradcheck(fn, ins)
    assert torch.autograd.gradgradcheck(fn, ins)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saves_no_hidden_activation_twice(backend):
    """The torch path keeps the pre-activation only (not GELU's output too); Triton keeps
    only the inputs."""
    torch.manual_seed(6)
    x, w1, b1, w2, b2, r, g = _inputs(4, 9, 32, 48, torch.float32)
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_mixing(x, w1, b1, w2, b2, residual=r, backend=backend)
    big = [t for t in saved if t.numel() >= 4 * 48 * 32]
    assert len(big) == (1 if backend == "torch" else 0), [tuple(t.shape) for t in big]
    assert not any(t is r for t in saved), "an ungated residual enters linearly and need not be kept"
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_mixing(x, w1, b1, w2, b2, residual=r, gate=g, backend=backend)
    assert any(t is r for t in saved) and any(t is g for t in saved)  # dgate needs the pre-gate output


def test_function_computes_in_float32_for_half_inputs():
    """bf16 in, bf16 out, float32 inside: equal to the float32 composition rounded once."""
    x, w1, b1, w2, b2, r, g = _inputs(2, 7, 9, 11, torch.bfloat16)
    y = TokenMixingFunction.apply(x, w1, b1, w2, b2, r, g)
    assert y.dtype == torch.bfloat16
    ref = token_mixing_composed(*[t.float() for t in (x, w1, b1, w2, b2, r, g)]).to(torch.bfloat16)
    assert (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()  # one bf16 rounding


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_in_the_autocast_dtype_with_gradients(backend):
    torch.manual_seed(7)
    ins = [t.requires_grad_() for t in _inputs(2, 9, 12, 10, torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = token_mixing(*ins[:5], residual=ins[5], gate=ins[6], backend=backend)
    assert y.dtype == torch.bfloat16
    ref = token_mixing_composed(*[t.detach().double() for t in ins])
    assert_close("y", ref, y, 2e-2)
    y.float().sum().backward()
    for name, t in zip(NAMES, ins):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all(), name


def test_triton_second_order_matches_torch():
    torch.manual_seed(8)
    outs = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(8)
        ins = [t.requires_grad_() for t in _inputs(2, 5, 6, 7, torch.float32)]
        y = token_mixing(*ins[:5], residual=ins[5], gate=ins[6], backend=backend)
        grads = torch.autograd.grad(y, ins, torch.ones_like(y), create_graph=True)
        outs[backend] = torch.autograd.grad(sum((gr**2).sum() for gr in grads), ins)
    for name, a, b in zip(NAMES, outs["torch"], outs["triton"]):
        assert_close("dd" + name, a, b, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_gpu_block_sizes_in_the_interpreter(monkeypatch, dtype):
    """The block sizes (and, for float16, the half-precision products) a GPU launch uses,
    run through the interpreter (bfloat16 products are wrong in the interpreter itself)."""
    import gatezoo.kernels.mixing.triton as tm

    monkeypatch.setattr(tm, "interpret_mode", lambda: False)
    torch.manual_seed(9)
    _check(_inputs(2, 40, 20, 70, dtype), "triton", dtype)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, w1, b1, w2, b2: (x[0], w1, b1, w2, b2), ValueError, r"x must have shape \(batch, tokens"),
        (lambda x, w1, b1, w2, b2: (x, w1[:, :3], b1, w2, b2), ValueError, r"w1 must have shape \(hidden, tokens\)"),
        (lambda x, w1, b1, w2, b2: (x, w1, b1, w2.t(), b2), ValueError, r"w2 must have shape \(tokens, hidden\)"),
        (lambda x, w1, b1, w2, b2: (x, w1, b1[:2], w2, b2), ValueError, "b1 must have shape"),
        (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2[:2]), ValueError, "b2 must have shape"),
        (lambda x, w1, b1, w2, b2: (x, w1.double(), b1, w2, b2), TypeError, "w1 must have x's dtype"),
        (lambda x, w1, b1, w2, b2: (x.long(), w1, b1, w2, b2), TypeError, "x must be"),
        (lambda x, w1, b1, w2, b2: (x, None, b1, w2, b2), TypeError, "w1 must be a tensor"),
    ],
)
def test_bad_input(make, exc, match):
    x, w1, b1, w2, b2, _, _ = _inputs(2, 5, 3, 4, torch.float32)
    with pytest.raises(exc, match=match):
        token_mixing(*make(x, w1, b1, w2, b2))


def test_bad_residual_and_gate():
    x, w1, b1, w2, b2, r, g = _inputs(2, 5, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        token_mixing(x, w1, b1, w2, b2, residual=r[:1])
    with pytest.raises(TypeError, match="gate must have x's dtype"):
        token_mixing(x, w1, b1, w2, b2, gate=g.half())
