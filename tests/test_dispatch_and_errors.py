"""Backend selection and the errors users get for bad input."""

import pytest
import torch

from gatezoo.kernels import gated_act, glu, glu_packed, resolve_backend


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
