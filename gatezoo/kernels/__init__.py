"""Functional ops on tensors: fused Triton kernels, their PyTorch paths and autograd.

Every op takes ``backend="auto" | "torch" | "triton"``: Triton on CUDA tensors, the memory-lean
PyTorch path elsewhere; ``GATEZOO_BACKEND`` sets the default. The full rule, including the
``torch.compile`` and float64 cases, is in :mod:`gatezoo.kernels.backend` (see
docs/architecture.md, 'Backend dispatch').

Layout (the template later ops copy). Each op lives in a folder of its own (``activation``,
``rela``, ``norm``, ``mixing``, ``routing``, ``kan``) with the same files:

* ``naive.py`` - the readable oracle: a plain composition of PyTorch ops that autograd
  differentiates. Float64 oracle in the tests, eager peer in the benchmarks, what
  ``torch.compile`` traces, and what the second-order fallback differentiates.
* ``torch_path.py`` - the tuned PyTorch backend: a memory-lean ``torch.autograd.Function``.
* ``triton.py`` - the Triton kernels and their ``torch.autograd.Function``; it imports only
  public names from other modules, and registers its ahead-of-time variants with
  :func:`gatezoo.kernels.kernel_specs.register`.
* ``__init__.py`` - the public op: validates its arguments, then calls
  :func:`gatezoo.kernels.backend.dispatch` with the naive, torch and Triton callables (the
  Triton module imported inside its callable, so importing gatezoo never imports triton).

To add an op, copy this layout (``routing`` is the newest example): naive.py, torch_path.py,
triton.py, and an __init__.py that dispatches; in both autograd functions, answer ``backward`` under
``torch.is_grad_enabled()`` with :func:`gatezoo.kernels.backend.composed_grads`; register the
Triton variants with ``kernel_specs.register`` and import the new ``triton.py`` in
:func:`gatezoo.kernels.aot.all_specs` so that ``python -m gatezoo.kernels.aot`` compiles them.
Shared modules: ``backend.py`` (dispatch, second-order fallback), ``kernel_specs.py`` (the
registry of kernel variants), ``scratch.py`` (reused CPU buffers), ``aot.py`` (the compile
report).
"""

from .activation import KINDS, ActKind, gated_act, glu, glu_packed
from .backend import BACKENDS, resolve_backend, triton_available
from .drop import dropout
from .kan import kan_linear
from .mixing import token_mixing
from .norm import gated_rms_norm, rms_norm
from .rela import rela_attention
from .routing import DispatchPlan, Routing, expert_ffn, grouped_mm, make_plan, permute, route, unpermute

__all__ = [
    "BACKENDS", "KINDS", "ActKind", "DispatchPlan", "Routing", "dropout", "expert_ffn", "gated_act",
    "gated_rms_norm", "glu", "glu_packed", "grouped_mm", "kan_linear", "make_plan", "permute", "rela_attention",
    "resolve_backend", "rms_norm", "route", "token_mixing", "triton_available", "unpermute",
]
