"""The registry of Triton kernel variants that ``python -m gatezoo.kernels.aot`` compiles.

Each op's ``triton.py`` describes the variants worth compiling ahead of time as
:class:`KernelSpec` objects and hands a function returning them to :func:`register` when it is
imported; :mod:`gatezoo.kernels.aot` imports those modules and reads :func:`registered_specs`.
This module imports no kernel module, so the kernel modules and the report never import each
other (see docs/architecture.md, 'Layers and layout').
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class KernelSpec:
    """One compile of one kernel: argument types, constexpr values and launch options.

    ``signature`` maps every runtime argument to a Triton type (``"*fp32"``, ``"i32"``...).
    Pointers and the integer arguments not listed in ``unaligned`` are compiled with the
    16-divisibility hint Triton gives them at run time for aligned tensors and sizes.
    ``matmul`` marks kernels that must use the tensor cores.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    matmul: bool = False
    unaligned: tuple = field(default=("R",))


_PROVIDERS: list[Callable[[], list[KernelSpec]]] = []


def register(provider: Callable[[], list[KernelSpec]]) -> None:
    """Add a function that returns the :class:`KernelSpec` variants of one kernel module."""
    _PROVIDERS.append(provider)


def registered_specs() -> list[KernelSpec]:
    """Every variant of every provider registered so far, in registration order."""
    return [spec for provider in _PROVIDERS for spec in provider()]
