"""The activation table shared by the naive composition, the torch path and the Triton kernels.

Every kind is a gate ``g`` with range (0, 1) and an order: order 1 gives
``phi(a) = expand(g(a), alpha)``, order 2 gives ``phi(a) = a * expand(g(a), alpha)``, with
``expand(g, alpha) = (1 + 2 alpha) g - alpha`` (Huang 2024) and ``alpha = 0`` when not given.
``identity`` (Bilinear) and ``relu`` (ReGLU) have no gate and take no ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Gate ids, also the values of the GATE constexpr in the Triton kernels.
SIGMOID, ARCTAN, NORMCDF, IDENTITY, RELU = range(5)


@dataclass(frozen=True)
class ActKind:
    """One row of the activation table."""

    name: str
    gate: int
    order: int
    takes_alpha: bool
    glu_name: str  # the GLU variant this kind gives, in the papers' words

    @property
    def gate_name(self) -> str:
        """The gate in words: sigmoid, arctan, normcdf, identity or relu."""
        return ("sigmoid", "arctan", "normcdf", "identity", "relu")[self.gate]


KINDS: dict[str, ActKind] = {
    k.name: k
    for k in (
        ActKind("sigmoid", SIGMOID, 1, True, "GLU"),
        ActKind("arctan", ARCTAN, 1, True, "ATGLU-1"),
        ActKind("normcdf", NORMCDF, 1, True, "Phi-GLU"),
        ActKind("identity", IDENTITY, 1, False, "Bilinear"),
        ActKind("relu", RELU, 1, False, "ReGLU"),
        ActKind("silu", SIGMOID, 2, True, "SwiGLU"),
        ActKind("gelu", NORMCDF, 2, True, "GEGLU"),
        ActKind("atlu", ARCTAN, 2, True, "ATGLU"),
    )
}


def get_kind(kind: str) -> ActKind:
    """Look up ``kind`` in :data:`KINDS`, raising ``ValueError`` that lists the valid names."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]
