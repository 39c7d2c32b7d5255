"""Backend choice, the dispatch rule and the second-order fallback shared by every op.

This module is the entry point of the op template (see docs/architecture.md, 'Backend
dispatch'). Every public op validates its arguments and then calls :func:`dispatch` with three
zero-argument callables: ``naive`` (the plain composition of the op's ``naive.py``),
``torch_path`` (the memory-lean autograd.Function of its ``torch_path.py``) and ``triton_path``
(the fused kernels of its ``triton.py``, imported inside the callable so that importing gatezoo
never imports triton). The rule, in order:

1. Resolve ``backend`` with :func:`resolve_backend`. ``"auto"`` means ``GATEZOO_BACKEND`` when
   that is set, else Triton for CUDA tensors (when triton imports) and the torch path elsewhere.
   ``"triton"`` forced where Triton cannot run (no triton package, or CPU tensors without
   ``TRITON_INTERPRET=1`` set before triton is imported) raises ``RuntimeError``; an unknown name
   raises ``ValueError``.
2. If there is nothing to compute (``empty``) or ``torch.compiler.is_compiling()`` is true, run
   ``naive()``: under ``torch.compile`` the compiler traces and fuses the plain composition
   instead of stopping at an opaque autograd.Function.
3. If the backend resolved to Triton, ask ``triton_unsupported()`` whether these inputs are
   beyond the kernels (default: any float64 input, see :func:`float64_unsupported`). It returns
   None, or ``(exception class, reason)``. When the caller passed ``backend="triton"`` itself,
   that exception is raised with the message ``"backend='triton' " + reason``; otherwise (auto,
   or the ``GATEZOO_BACKEND`` default) the call quietly takes the torch path.
4. Otherwise run ``triton_path()`` for Triton and ``torch_path()`` for the torch backend.

The second-order fallback lives here too: the fused backward passes are not themselves
differentiable, so when a backward runs with ``create_graph=True`` (``torch.is_grad_enabled()``
inside ``backward``) every autograd.Function hands over to :func:`composed_grads`, which
differentiates the op's plain composition with a graph.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("auto", "torch", "triton")

# What dispatch's ``triton_unsupported`` returns for inputs the Triton kernels do not take:
# None, or (exception class, reason); the reason completes "backend='triton' ...".
Unsupported = tuple[type[Exception], str] | None


@functools.cache
def triton_available() -> bool:
    """True when :mod:`triton` imports (it ships with Linux builds of PyTorch)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_backend() -> str:
    """The backend used when a call says ``backend="auto"`` (``GATEZOO_BACKEND`` or ``"auto"``)."""
    name = os.environ.get("GATEZOO_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"GATEZOO_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn a ``backend`` argument into ``"torch"`` or ``"triton"`` for these tensors.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when Triton is forced
    where it cannot run (no Triton, or CPU tensors without ``TRITON_INTERPRET=1``).
    """
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = backend.lower()
    source = f"backend={backend!r}"
    if backend == "auto":
        backend = default_backend()
        source = f"GATEZOO_BACKEND={backend!r}"
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{source} needs the triton package, which did not import")
        if not on_cuda and not interpret_mode():
            raise RuntimeError(
                f"{source} got CPU tensors; run Triton on CPU by setting TRITON_INTERPRET=1 "
                "before importing gatezoo, or use backend='torch'"
            )
    return backend


def positive_number(name: str, value) -> float:
    """``value`` as a float when it is a finite real number > 0 (not a bool); otherwise
    ``TypeError`` (not a number) or ``ValueError`` (NaN, infinite, zero or negative) naming ``name``."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def in_compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype the chunked torch paths compute in: float32, or float64 for float64 input."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def float64_unsupported(*tensors) -> Unsupported:
    """The default Triton limit: the kernels compute in float32 and take float16, bfloat16 and
    float32 inputs only, so any float64 tensor among ``tensors`` sends the call elsewhere."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return TypeError, f"supports float16, bfloat16 and float32 inputs, got {t.dtype}"
    return None


def dispatch(
    backend: str,
    lead_tensor: torch.Tensor,
    *,
    naive: Callable[[], torch.Tensor],
    torch_path: Callable[[], torch.Tensor],
    triton_path: Callable[[], torch.Tensor],
    triton_unsupported: Callable[[], Unsupported] | None = None,
    empty: bool = False,
) -> torch.Tensor:
    """Run one op through the backend it resolves to (the rule is in the module docstring).

    Args:
        backend: the op's ``backend`` argument, ``"auto" | "torch" | "triton"``.
        lead_tensor: the input whose device decides the backend.
        naive, torch_path, triton_path: zero-argument callables computing the op's result
            with the plain composition, the torch path and the Triton kernels.
        triton_unsupported: zero-argument callable returning None when the Triton kernels take
            these inputs, else ``(exception class, reason)``; by default float64 ``lead_tensor``
            is unsupported.
        empty: True when there is nothing to compute (the naive composition returns the
            right empty or trivial result without launching anything).
    """
    chosen = resolve_backend(backend, lead_tensor)
    if empty or torch.compiler.is_compiling():
        return naive()
    if chosen == "triton":
        check = triton_unsupported or (lambda: float64_unsupported(lead_tensor))
        problem = check()
        if problem is None:
            return triton_path()
        if backend.lower() == "triton":
            exc, reason = problem
            raise exc(f"backend='triton' {reason}")
    return torch_path()


def composed_grads(ctx, composed: Callable[..., torch.Tensor], args: Sequence, grad_out: torch.Tensor) -> tuple:
    """The gradients an autograd.Function's ``backward`` returns, taken through ``composed``.

    For backward passes that are themselves differentiated (``create_graph=True``, seen as
    ``torch.is_grad_enabled()`` inside ``backward``): ``composed(*args)`` is rebuilt under
    ``enable_grad`` and differentiated with ``create_graph=True`` against ``grad_out``, so the
    second-order gradients are those of the plain composition. ``args`` are the forward's
    arguments in order (tensors as saved, options as given). The result has one entry per
    forward argument: the gradient for each tensor whose ``ctx.needs_input_grad`` is set (zeros
    when the composition does not use it), None for everything else.
    """
    n = len(ctx.needs_input_grad)
    wrt = [i for i, t in enumerate(args[:n]) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
    out = [None] * n
    if not wrt:
        return tuple(out)
    with torch.enable_grad():
        y = composed(*args)
        grads = torch.autograd.grad(y, [args[i] for i in wrt], grad_out, create_graph=True, allow_unused=True)
    for i, g in zip(wrt, grads):
        out[i] = torch.zeros_like(args[i]) if g is None else g
    return tuple(out)


def on_device(t: torch.Tensor):
    """Context for launching kernels on ``t``'s GPU rather than whichever is current (Triton
    launches on the current device); a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
