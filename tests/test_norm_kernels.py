"""rms_norm and gated_rms_norm (torch path) against a float64 oracle."""

import pytest
import torch
from closeness import TOL, assert_close

from gatezoo.kernels.norm import gated_rms_norm, gated_rms_norm_composed, rms_norm, rms_norm_composed

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gated", [False, True], ids=["rms", "gated"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contig", "transposed"])
def test_matches_float64(gated, dtype, layout, backend):
    d = 37
    x = torch.randn(3, 5, d) if layout == "contig" else torch.randn(3, d, 5).transpose(1, 2)
    x = x.to(dtype)
    x[0, 0] = 0  # a zero row
    w = (1 + 0.1 * torch.randn(d)).to(dtype)
    u = ((torch.rand(d) * 2 - 1) * (3 / d) ** 0.5).to(dtype)
    ref_in = [t.double().requires_grad_() for t in ((x, w, u) if gated else (x, w))]
    ins = [t.detach().clone().requires_grad_() for t in ((x, w, u) if gated else (x, w))]
    ref = gated_rms_norm_composed(*ref_in) if gated else rms_norm_composed(*ref_in)
    out = gated_rms_norm(*ins, backend=backend) if gated else rms_norm(*ins, backend=backend)
    assert out.dtype == dtype
    assert_close("y", ref, out, TOL[dtype])
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    dy = torch.randn(out.shape).to(dtype)
    for name, g_ref, g in zip(("dx", "dweight", "dgate_weight"), torch.autograd.grad(ref, ref_in, dy.double()),
                              torch.autograd.grad(out, ins, dy)):
        assert torch.isfinite(g).all(), name
        assert_close(name, g_ref, g, TOL[dtype])


@pytest.mark.parametrize("gated", [False, True], ids=["rms", "gated"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contig", "transposed"])
def test_torch_path_in_several_chunks(gated, dtype, layout, monkeypatch):
    """The CPU path walks the rows in chunks: two rows per chunk here (15 rows, a short last
    chunk), against the same float64 oracle."""
    import gatezoo.kernels.norm.torch_path as norm_torch

    monkeypatch.setattr(norm_torch, "CPU_CHUNK_ELEMENTS", 2 * 37)
    assert len(norm_torch._row_chunks(15, 37, torch.device("cpu"))) == 8
    test_matches_float64(gated, dtype, layout, "torch")


def test_gradcheck_and_second_order():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gated_rms_norm, (x, w, u))
    assert torch.autograd.gradcheck(rms_norm, (x, w))
    assert torch.autograd.gradgradcheck(gated_rms_norm, (x, w, u))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: rms_norm(torch.randn(2, 4), torch.ones(5)), ValueError, r"weight must have shape \(4,\)"),
        (lambda: gated_rms_norm(torch.randn(2, 4), torch.ones(4), torch.ones(3)), ValueError, "gate_weight"),
        (lambda: rms_norm(torch.arange(4), torch.ones(4)), TypeError, "x must be"),
        (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), eps=0.0), ValueError, "eps must be a finite number > 0"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_weights_and_many_programs(backend):
    """Weights that are column views of a matrix (stride 2), and enough rows for several Triton
    programs, so the per-program weight-gradient partial sums are added up."""
    d = 24
    wu = torch.randn(d, 2, requires_grad=True)
    x = torch.randn(300, d, requires_grad=True)
    w, u = wu[:, 0], wu[:, 1]
    assert w.stride(0) == 2
    ref_in = [x.detach().double().requires_grad_(), wu.detach().double().requires_grad_()]
    ref = gated_rms_norm_composed(ref_in[0], ref_in[1][:, 0], ref_in[1][:, 1])
    out = gated_rms_norm(x, w, u, backend=backend)
    assert_close("y", ref, out, 1e-5)
    dy = torch.randn(out.shape)
    for name, g_ref, g in zip(("dx", "dw and du"), torch.autograd.grad(ref, ref_in, dy.double()),
                              torch.autograd.grad(out, [x, wu], dy)):
        assert_close(name, g_ref, g, 1e-5)
    plain = rms_norm(x, w, backend=backend)
    assert_close("rms", rms_norm_composed(x.detach().double(), w.detach().double()), plain, 1e-5)


@pytest.mark.parametrize("gated", [False, True], ids=["rms", "gated"])
def test_triton_second_order_matches_float64(gated):
    """create_graph=True through the Triton kernels differentiates the composition instead."""
    d = 10
    ins = [torch.randn(4, d), 1 + 0.1 * torch.randn(d)] + ([torch.randn(d)] if gated else [])
    fn = gated_rms_norm_composed if gated else rms_norm_composed
    op = gated_rms_norm if gated else rms_norm
    ref_in = [t.double().requires_grad_() for t in ins]
    got_in = [t.clone().requires_grad_() for t in ins]
    for f, args in ((fn, ref_in), (lambda *a: op(*a, backend="triton"), got_in)):
        (gx,) = torch.autograd.grad(f(*args).square().sum(), args[0], create_graph=True)
        gx.square().sum().backward()
    for name, t_ref, t in zip(("x", "weight", "gate_weight"), ref_in, got_in):
        assert_close("second order d" + name, t_ref.grad, t.grad, 1e-5)
