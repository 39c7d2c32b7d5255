"""Backend selection and the errors users get for bad input."""

import pytest
import torch
from closeness import assert_close

from gatezoo.kernels import (
    KINDS,
    gated_act,
    gated_rms_norm,
    glu,
    glu_packed,
    rela_attention,
    resolve_backend,
    rms_norm,
    token_mixing,
)
from gatezoo.kernels.activation.naive import phi_composed
from gatezoo.kernels.backend import composed_grads, dispatch
from gatezoo.kernels.mixing import token_mixing_composed
from gatezoo.kernels.norm import gated_rms_norm_composed, rms_norm_composed
from gatezoo.kernels.rela import rela_composed


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("GATEZOO_BACKEND", raising=False)
    assert resolve_backend("auto", torch.randn(2)) == "torch"


def test_env_sets_the_default(monkeypatch):
    monkeypatch.setenv("GATEZOO_BACKEND", "triton")
    assert resolve_backend("auto", torch.randn(2)) == "triton"  # interpreter is on in tests
    monkeypatch.setenv("GATEZOO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GATEZOO_BACKEND"):
        resolve_backend("auto", torch.randn(2))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_act(torch.randn(3), "silu", backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.randn(2))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: gated_act(torch.randn(3), "swish"), ValueError, "kind must be one of"),
        (lambda: gated_act(torch.randn(3), "relu", 0.5), ValueError, "alpha is not defined for kind='relu'"),
        (lambda: glu(torch.randn(3), torch.randn(3), "identity", 0.1), ValueError, "alpha is not defined"),
        (lambda: glu(torch.randn(3, 4), torch.randn(3, 5), "silu"), ValueError, "same shape"),
        (lambda: glu(torch.randn(3), torch.randn(3).half(), "silu"), TypeError, "same dtype"),
        (lambda: glu_packed(torch.randn(3, 5), "silu"), ValueError, "even last dimension"),
        (lambda: glu_packed(torch.tensor(1.0), "silu"), ValueError, "even last dimension"),
        (lambda: gated_act(torch.arange(4), "silu"), TypeError, "x must be float16"),
        (lambda: glu(torch.randn(2), torch.arange(2), "silu"), TypeError, "b must be float16"),
        (lambda: gated_act([1.0, 2.0], "silu"), TypeError, "x must be a torch.Tensor"),
        (lambda: gated_act(torch.randn(3), "silu", torch.randn(2)), ValueError, "alpha must be a scalar"),
        (lambda: gated_act(torch.randn(3), "silu", "0.5"), TypeError, "alpha must be a float"),
        (lambda: gated_act(torch.randn(3), "silu", torch.tensor(1)), TypeError, "alpha must be a floating"),
        (lambda: gated_act(torch.randn(3).double(), "silu", backend="triton"), TypeError, "backend='triton' supports"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_float64_auto_uses_torch_path():
    x = torch.randn(4, 5, dtype=torch.float64)
    assert gated_act(x, "gelu").dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# The dispatch rule and the second-order fallback of gatezoo.kernels.backend


def _paths(log):
    """naive / torch_path / triton_path callables that record which one ran."""
    return {name: (lambda name=name: log.append(name) or name) for name in ("naive", "torch_path", "triton_path")}


def test_dispatch_forced_triton_on_float64_raises():
    log = []
    with pytest.raises(TypeError, match=r"backend='triton' supports float16, bfloat16 and float32 inputs, got "
                                        r"torch.float64"):
        dispatch("triton", torch.randn(3, dtype=torch.float64), **_paths(log))
    assert log == []


def test_dispatch_auto_falls_back_to_the_torch_path(monkeypatch):
    x = torch.randn(3, dtype=torch.float64)
    log = []
    assert dispatch("auto", x, **_paths(log)) == "torch_path"  # CPU: auto is the torch path
    monkeypatch.setenv("GATEZOO_BACKEND", "triton")  # auto now resolves to Triton (interpreter on)
    assert dispatch("auto", x, **_paths(log)) == "torch_path"  # float64: quietly the torch path
    assert dispatch("auto", x.float(), **_paths(log)) == "triton_path"
    assert log == ["torch_path", "torch_path", "triton_path"]


def test_dispatch_rule_order(monkeypatch):
    x = torch.randn(3)
    log = []
    assert dispatch("torch", x, **_paths(log)) == "torch_path"
    assert dispatch("triton", x, **_paths(log)) == "triton_path"
    assert dispatch("triton", x, **_paths(log), empty=True) == "naive"
    unsupported = lambda: (ValueError, "takes at most 4 of something, got 5")
    assert dispatch("torch", x, **_paths(log), triton_unsupported=unsupported) == "torch_path"
    with pytest.raises(ValueError, match=r"^backend='triton' takes at most 4 of something, got 5$"):
        dispatch("triton", x, **_paths(log), triton_unsupported=unsupported)
    with pytest.raises(ValueError, match="backend must be one of"):  # the name is checked first
        dispatch("cuda", x, **_paths(log), empty=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch("triton", x, **_paths(log)) == "naive"
    assert log == ["torch_path", "triton_path", "naive", "torch_path", "naive"]


class _Ctx:
    def __init__(self, *needs):
        self.needs_input_grad = needs


def test_composed_grads_one_entry_per_forward_argument():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, dtype=torch.float64)
    composed = lambda x, w, unused, scale, name: scale * torch.sin(x) * w
    grads = composed_grads(_Ctx(True, False, True, False, False), composed, (x, w, unused, 2.0, "sin"), dy)
    assert len(grads) == 5 and grads[1] is None and grads[3] is None and grads[4] is None
    assert torch.allclose(grads[0], 2.0 * torch.cos(x) * w * dy)
    assert torch.equal(grads[2], torch.zeros_like(unused))
    assert grads[0].requires_grad  # built with create_graph=True, so it differentiates again
    (dw,) = torch.autograd.grad(grads[0].sum(), w)
    assert torch.allclose(dw, 2.0 * torch.cos(x) * dy)


def _double(*shape):
    return torch.randn(shape, dtype=torch.float64, requires_grad=True)


# One case per kind of op: the torch path's backward under create_graph=True goes through
# composed_grads, so gradgradcheck compares it with finite differences of the gradient.
SECOND_ORDER = {
    "glu": (lambda a, b, al: glu(a, b, "silu", al, backend="torch"),
            lambda: (_double(3, 5), _double(3, 5), _double())),
    "glu_packed": (lambda x, al: glu_packed(x, "atlu", al, backend="torch"), lambda: (_double(3, 8), _double())),
    "rela_attention": (lambda q, k, v: rela_attention(q, k, v, causal=True, backend="torch"),
                       lambda: (_double(1, 2, 3, 4), _double(1, 1, 3, 4), _double(1, 1, 3, 4))),
    "gated_rms_norm": (lambda x, w, u: gated_rms_norm(x, w, u, backend="torch"),
                       lambda: (_double(3, 5), _double(5), _double(5))),
    "token_mixing": (lambda x, w1, b1, w2, b2, r: token_mixing(x, w1, b1, w2, b2, residual=r, backend="torch"),
                     lambda: (_double(2, 3, 2), _double(4, 3), _double(4), _double(3, 4), _double(3),
                              _double(2, 3, 2))),
}


@pytest.mark.parametrize("op", list(SECOND_ORDER))
def test_composed_grads_gradgradcheck(op):
    fn, make = SECOND_ORDER[op]
    args = make()
    assert torch.autograd.gradgradcheck(fn, args)


# ----------------------------------------------------------------------------------------------
# Under torch.compile every op runs its naive composition (no opaque autograd.Function)


# The autograd.Functions inside the naive compositions themselves: plain, traceable ops that give
# the values docs/activation.md defines at +-inf and NaN (a traced one shows as ApplyTemplate).
NAIVE_FUNCTIONS = {"_PhiDefinedBackward", "_DefinedGELUBackward", "ApplyTemplateBackward"}


def _custom_function_nodes(y):
    """Names of the autograd.Function nodes (torch path or Triton) in y's graph."""
    seen, todo, found = set(), [y.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction) and type(node).__name__ not in NAIVE_FUNCTIONS:
            found.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return found


def _op_cases():
    """name -> (call(backend), naive()) on fresh float32 inputs that require gradients."""
    g = lambda *s: torch.randn(*s, requires_grad=True)
    a, b, x2 = g(3, 5), g(3, 5), g(3, 10)
    al = torch.tensor(0.25, requires_grad=True)
    q, k, v = g(1, 2, 4, 8), g(1, 1, 4, 8), g(1, 1, 4, 8)
    mask = torch.tensor([[True, True, False, True]])
    x, w, u = g(3, 6), g(6), g(6)
    xm, w1, b1, w2, b2, r, gate = g(2, 5, 3), g(7, 5), g(7), g(5, 7), g(5), g(2, 5, 3), g(2, 5, 3)
    silu = KINDS["silu"]
    return {
        "gated_act": (lambda be: gated_act(a, "silu", al, backend=be), lambda: phi_composed(a, silu, al)),
        "glu": (lambda be: glu(a, b, "silu", al, backend=be), lambda: phi_composed(a, silu, al) * b),
        "glu_packed": (lambda be: glu_packed(x2, "silu", al, backend=be),
                       lambda: phi_composed(x2[..., :5], silu, al) * x2[..., 5:]),
        "rela_attention": (lambda be: rela_attention(q, k, v, causal=True, key_padding_mask=mask, backend=be),
                           lambda: rela_composed(q, k, v, True, mask, 8**-0.5)),
        "rms_norm": (lambda be: rms_norm(x, w, backend=be), lambda: rms_norm_composed(x, w)),
        "gated_rms_norm": (lambda be: gated_rms_norm(x, w, u, backend=be), lambda: gated_rms_norm_composed(x, w, u)),
        "token_mixing": (lambda be: token_mixing(xm, w1, b1, w2, b2, residual=r, gate=gate, backend=be),
                         lambda: token_mixing_composed(xm, w1, b1, w2, b2, r, gate)),
    }


OPS = list(_op_cases())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_compiling_runs_the_naive_composition(monkeypatch, op, backend):
    call, naive = _op_cases()[op]
    eager = call(backend)
    assert _custom_function_nodes(eager), "outside torch.compile the op runs its autograd.Function"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = call(backend)
    assert _custom_function_nodes(y) == []
    assert torch.equal(y, naive())


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_traces_without_graph_breaks(op):
    """A real trace (the eager backend of torch.compile, so nothing is generated): fullgraph=True
    fails on any graph break, which an opaque autograd.Function with a non-traceable body
    would be."""
    call, naive = _op_cases()[op]
    torch._dynamo.reset()
    y = torch.compile(lambda: call("auto"), backend="eager", fullgraph=True)()
    assert_close(op, naive(), y, 1e-6)
    assert _custom_function_nodes(y) == []
