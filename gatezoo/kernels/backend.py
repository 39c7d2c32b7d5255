"""Backend selection shared by every op in :mod:`gatezoo.kernels` (DESIGN.md §2).

``backend="auto"`` picks Triton for CUDA tensors when Triton imports, else the PyTorch
reference path. ``"triton"`` forces the Triton kernels (on CPU this needs ``TRITON_INTERPRET=1``
set before :mod:`triton` is imported) and ``"torch"`` forces the reference. The environment
variable ``GATEZOO_BACKEND`` replaces ``"auto"`` as the default.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


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


def on_device(t: torch.Tensor):
    """Context for launching kernels on ``t``'s GPU rather than whichever is current (Triton
    launches on the current device); a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
