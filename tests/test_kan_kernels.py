"""kan_linear (torch path and Triton kernels) against the float64 Cox-de Boor composition."""

import pytest
import torch
from closeness import TOL, assert_close
from torch import nn

from gatezoo.blocks import KANLayer
from gatezoo.kernels import kan_linear
from gatezoo.kernels.kan import kan_linear_composed, num_basis
from gatezoo.kernels.kan.torch_path import piece_matrix

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (basis, spline order, base activation, bias): cubic B-splines with SiLU (KAN's default), the
# step basis without a base branch, quadratic with ELU, RBF bumps with ReLU
CASES = {"bspline3-silu": ("bspline", 3, "silu", True), "bspline0-nobase": ("bspline", 0, None, False),
         "bspline2-elu": ("bspline", 2, "elu", True), "rbf-relu": ("rbf", 3, "relu", False)}
GRID = dict(grid_range=(-1.5, 2.0), grid_size=4)


def _inputs(case, dtype, layout, n_in=21, n_out=7):
    basis, order, act, bias = CASES[case]
    nb = num_basis(GRID["grid_size"], order, basis)
    # wide enough that some inputs fall outside the extended grid, where only the base is left
    x = torch.randn(3, 5, n_in) * 2.5 if layout == "contig" else (torch.randn(3, n_in, 5) * 2.5).transpose(1, 2)
    tensors = [x, torch.randn(n_out, n_in, nb) / nb ** 0.5, torch.randn(n_out, n_in) / n_in ** 0.5 if act else None,
               torch.randn(n_out) if bias else None]
    tensors = [None if t is None else t.to(dtype) for t in tensors]
    opts = dict(basis=basis, spline_order=order, base_activation=act, **GRID)
    return tensors, opts


def _oracle(tensors, opts):
    o = dict(opts)
    return kan_linear_composed(*tensors, base_act=o.pop("base_activation"), **o)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contig", "transposed"])
def test_matches_float64(case, dtype, layout, backend):
    tensors, opts = _inputs(case, dtype, layout)
    ref_in = [None if t is None else t.double().requires_grad_() for t in tensors]
    ins = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    ref = _oracle(ref_in, opts)
    out = kan_linear(*ins, backend=backend, **opts)
    assert out.dtype == dtype and out.shape == (3, 5, 7)
    assert_close("y", ref, out, TOL[dtype])
    dy = torch.randn(out.shape).to(dtype)
    names = ("dx", "dspline_weight", "dbase_weight", "dbias")
    pairs = [(n, a, b) for n, a, b in zip(names, ref_in, ins) if a is not None]
    grads_ref = torch.autograd.grad(ref, [a for _, a, _ in pairs], dy.double())
    grads = torch.autograd.grad(out, [b for _, _, b in pairs], dy)
    for (name, _, leaf), g_ref, g in zip(pairs, grads_ref, grads):
        assert g.dtype == leaf.dtype and torch.isfinite(g).all(), name
        assert_close(name, g_ref, g, TOL[dtype])


@pytest.mark.parametrize("case", list(CASES))
def test_torch_path_in_several_chunks(case, monkeypatch):
    """The CPU path walks the rows in blocks: two rows per block here (15 rows, a short last one)."""
    import gatezoo.kernels.kan.torch_path as kan_torch

    tensors, opts = _inputs(case, torch.float32, "contig")
    per_row = 21 * kan_torch.width(kan_torch.KANSpec(opts["basis"], -1.5, 2.0, 4, opts["spline_order"], None))
    monkeypatch.setattr(kan_torch, "CPU_CHUNK_ELEMENTS", 2 * per_row)
    assert len(kan_torch._row_chunks(15, per_row, torch.device("cpu"))) == 8
    test_matches_float64(case, torch.float32, "contig", "torch")


def test_piece_matrix_is_a_partition_of_unity_and_matches_the_recursion():
    for p in range(5):
        m = piece_matrix(p)
        assert m.shape == (p + 1, p + 1)
        assert torch.allclose(m.sum(1), torch.eye(p + 1, dtype=torch.float64)[0])  # sum_r N_r(u) = 1
    # cubic pieces, by hand: (1-u)^3/6, (3u^3 - 6u^2 + 4)/6, (-3u^3 + 3u^2 + 3u + 1)/6, u^3/6
    want = torch.tensor([[1, 4, 1, 0], [-3, 0, 3, 0], [3, -6, 3, 0], [-1, 3, -3, 1]], dtype=torch.float64) / 6
    assert torch.allclose(piece_matrix(3), want)


def test_gradcheck_and_second_order():
    x = (torch.randn(4, 5, dtype=torch.float64) * 2).requires_grad_()
    c = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda *t: kan_linear(*t, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, c, w, b))
    assert torch.autograd.gradgradcheck(f, (x, c, w, b))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["bspline3-silu", "rbf-relu", "bspline0-nobase"])
def test_special_values_follow_the_composition(case, backend):
    """A basis function is 0 at +-inf (outside its support) and NaN at NaN; SiLU takes +inf / -0
    at +-inf with slopes 1 / 0. Both paths give the composition's values and gradients, NaN
    where it has NaN."""
    tensors, opts = _inputs(case, torch.float32, "contig", n_in=6, n_out=3)
    x = tensors[0][:1, :4].clone()
    x[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), 0.25])
    x[0, 1, 2] = float("nan")
    tensors[0] = x
    ref_in = [None if t is None else t.double().requires_grad_() for t in tensors]
    ins = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    ref, out = _oracle(ref_in, opts), kan_linear(*ins, backend=backend, **opts)
    assert torch.equal(torch.isnan(ref), torch.isnan(out)) and torch.isnan(out[0, 1]).all()
    assert torch.equal(ref[0, 0].isinf(), out[0, 0].isinf())
    fin = torch.isfinite(ref)
    assert torch.allclose(ref[fin].float(), out[fin], rtol=1e-4, atol=1e-5)
    g_ref = torch.autograd.grad(ref[0, 0].sum(), ref_in[0])[0]
    g = torch.autograd.grad(out[0, 0].sum(), ins[0])[0]
    assert torch.isfinite(g[0, 0]).all()  # no 0 * inf in the slopes at +-inf
    assert torch.allclose(g_ref.float(), g, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_saves_only_its_inputs():
    """The (N, in, basis) tensor never outlives the forward: autograd keeps x and the weights,
    where the composition keeps every Cox-de Boor level."""
    from gatezoo.eval.benchcore import saved_bytes

    x = torch.randn(512, 64, requires_grad=True)
    c = torch.randn(16, 64, 8, requires_grad=True)
    w = torch.randn(16, 64, requires_grad=True)
    ours = saved_bytes(lambda t: kan_linear(t, c, w, backend="torch").sum(), [x])
    plain = saved_bytes(lambda t: kan_linear_composed(t, c, w).sum(), [x])
    inputs = 4 * (x.numel() + c.numel() + w.numel())
    assert ours <= inputs
    assert plain > 10 * ours


@pytest.mark.parametrize("base", [nn.SiLU, nn.ELU, nn.ReLU, nn.Tanh, None])
def test_layer_runs_the_op_and_matches_the_composition(base):
    """KANLayer's forward is kan_linear (a base class the op does not fuse, here Tanh, runs as a
    module beside it) and equals the plain composition of its own basis_values."""
    layer = KANLayer(6, 4, grid_size=3, bias=True, base_activation=base, dtype=torch.float64)
    x = torch.randn(2, 7, 6, dtype=torch.float64) * 2
    want = torch.einsum("...ij,oij->...o", layer.basis_values(x), layer.spline_weight) + layer.bias
    if base is not None:
        want = want + base()(x) @ layer.base_weight.T
    assert_close("layer", want, layer(x), 1e-12)
    assert layer.fused_act == {nn.SiLU: "silu", nn.ELU: "elu", nn.ReLU: "relu"}.get(base)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: kan_linear(torch.ones(2, 3, dtype=torch.long), torch.ones(1, 3, 8)), TypeError, "x must be"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 4, 8), torch.ones(1, 3)), ValueError,
         r"spline_weight must have shape \(out_features, 3, 8\)"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8)), ValueError, "base_weight must be given"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(1, 3), base_activation=None),
         ValueError, "base_weight must be given"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(2, 3)), ValueError,
         r"base_weight must have shape \(1, 3\)"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(1, 3), torch.ones(2)), ValueError,
         r"bias must have shape \(1,\)"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(1, 3), basis="cheb"), ValueError,
         "basis must be one of"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(1, 3), grid_range=(1, 1)),
         ValueError, "grid_range must be finite with lo < hi"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(1, 3), grid_size=0), ValueError,
         "grid_size must be an int >= 1"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(1, 3), spline_order=1.5),
         TypeError, "spline_order must be an int"),
        (lambda: kan_linear(torch.ones(2, 3), torch.ones(1, 3, 8), torch.ones(1, 3), base_activation="gelu"),
         ValueError, "base_activation must be one of"),
        (lambda: kan_linear(torch.ones(2, 3, dtype=torch.float64), torch.ones(1, 3, 8, dtype=torch.float64),
                            torch.ones(1, 3, dtype=torch.float64), backend="triton"), TypeError,
         "backend='triton' supports float16, bfloat16 and float32"),
    ],
)
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_empty_input_gives_empty_output():
    x = torch.randn(0, 3, requires_grad=True)
    y = kan_linear(x, torch.randn(2, 3, 8), torch.randn(2, 3))
    assert y.shape == (0, 2)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_several_tiles_of_every_kind(backend):
    """More rows than one row tile (and than one weight-gradient slice), more outputs than one
    output tile, more inputs than one input tile, each with a ragged last tile."""
    tensors, opts = _inputs("bspline3-silu", torch.float32, "contig", n_in=40, n_out=20)
    tensors[0] = torch.randn(150, 40) * 2.5
    ref_in = [t.double().requires_grad_() for t in tensors]
    ins = [t.detach().clone().requires_grad_() for t in tensors]
    ref, out = _oracle(ref_in, opts), kan_linear(*ins, backend=backend, **opts)
    assert_close("y", ref, out, TOL[torch.float32])
    dy = torch.randn(out.shape)
    for name, g_ref, g in zip(("dx", "dspline_weight", "dbase_weight", "dbias"),
                              torch.autograd.grad(ref, ref_in, dy.double()), torch.autograd.grad(out, ins, dy)):
        assert_close(name, g_ref, g, TOL[torch.float32])
