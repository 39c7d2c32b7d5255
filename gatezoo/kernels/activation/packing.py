"""Argument handling shared by the torch path and the Triton path of the activation family.

Both autograd functions take ``(a, b, alpha, spec, packed)`` on 2-D row views, where a packed
GLU input ``x`` (R, 2N) carries ``a`` and ``b`` as its two halves and ``b`` is then None. The
helpers here split such an input, allocate gradient buffers in the same layout, assemble the
tuple ``backward`` returns, and evaluate the plain composition on these arguments for the
second-order fallback (see docs/architecture.md, 'Backend dispatch').
"""

from __future__ import annotations

import torch

from .kinds import ActKind
from .naive import phi_defined


def unpack(x, b, packed: bool):
    """(a, b) from the arguments of the autograd functions: the two halves of ``x`` when packed."""
    if packed:
        n = x.shape[1] // 2
        return x[:, :n], x[:, n:]
    return x, b


def grad_buffers(x, b, packed: bool, need_a: bool, need_b: bool):
    """(dx, da, db) to write gradients into: for a packed input one buffer ``dx`` whose halves
    are ``da`` and ``db``, else separate buffers (None where not needed)."""
    if packed:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return (dx, *unpack(dx, None, True))
    da = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_a else None
    db = torch.empty(b.shape, dtype=b.dtype, device=b.device) if b is not None and need_b else None
    return None, da, db


def input_grads(packed: bool, dx, da, db, dalpha):
    """The tuple ``backward`` returns for (a or x, b, alpha, spec, packed)."""
    return (dx, None, dalpha, None, None) if packed else (da, db, dalpha, None, None)


def composed_rows(x, b, alpha, spec: ActKind, packed: bool) -> torch.Tensor:
    """phi(a) [* b] through :func:`~.naive.phi_defined`, from the autograd functions'
    arguments (the halves of ``x`` when packed): what :func:`gatezoo.kernels.backend.composed_grads`
    differentiates for second-order gradients."""
    a, b = unpack(x, b, packed)
    y = phi_defined(a, spec, alpha)
    return y if b is None else y * b
