"""Attention-weight dropout of ReLA: which weights are dropped, as a pure function of position.

ReLA's authors drop the rectified weights ``A = relu(S)`` before ``A·V`` (rate 0.1 in their
code). The fused kernels cannot store a T x T mask, and the torch path may not (it never holds
one for backward), so the mask is not drawn from a random generator but computed: the weight of
query row ``i`` and key column ``j`` of flat query head ``bh = b·H + h`` is kept when

    hash(seed, bh, i, j) = mix(mix(mix(seed ^ mix(bh)) ^ i) ^ j)  >=  threshold = floor(p · 2³²)

with ``mix`` the 32-bit "lowbias32" finaliser of C. Wellons's hash prospector (two rounds of
multiply and xor-shift, all arithmetic mod 2³²):

    x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x846CA68B;  x ^= x >> 16

So every path (this module in torch, the Triton kernels in ``tl.uint32``, the composition under
``torch.compile``) drops the same weights for the same seed, and a backward pass regenerates the
mask of its forward from the seed alone. Kept weights are scaled by ``1/(1 - p)``. A weight is
kept with probability ``1 - threshold/2³²``, which differs from ``1 - p`` by less than 2⁻³².

The hash is a statistical mixer for dropout, **not** a cryptographic function: the mask is
predictable from the seed, and nothing about it should be relied on beyond looking random.

The torch side keeps the 32-bit values in int64 tensors (torch has no wrapping uint32
arithmetic) and multiplies in two 16-bit halves, so no product leaves int64's range.
"""

from __future__ import annotations

import math
import numbers

import torch

MIX_C1, MIX_C2 = 0x7FEB352D, 0x846CA68B
"""The two multipliers of :func:`mix32` (lowbias32)."""
SEED_LIMIT = 1 << 32
"""Seeds are ints in [0, SEED_LIMIT)."""
_MASK32 = 0xFFFFFFFF


def check_dropout(dropout_p, dropout_seed) -> tuple[float, int | None]:
    """``(dropout_p, dropout_seed)`` checked: p a real number (not a bool) in [0, 1), the seed
    None or an int in [0, 2³²). TypeError for a wrong type, ValueError for a wrong value, each
    naming the argument."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a number in [0, 1), got {dropout_p!r} ({type(dropout_p).__name__})")
    dropout_p = float(dropout_p)
    if not (math.isfinite(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None:
        if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral):
            raise TypeError(f"dropout_seed must be an int in [0, 2**32) or None, got {dropout_seed!r} "
                            f"({type(dropout_seed).__name__})")
        dropout_seed = int(dropout_seed)
        if not 0 <= dropout_seed < SEED_LIMIT:
            raise ValueError(f"dropout_seed must be in [0, 2**32), got {dropout_seed}")
    return dropout_p, dropout_seed


def draw_seed() -> int:
    """A seed from torch's default (CPU) generator, so ``torch.manual_seed`` repeats a run."""
    return int(torch.randint(0, SEED_LIMIT, (), dtype=torch.int64))


def threshold(p: float) -> int:
    """The 32-bit threshold below which a hash drops its weight: ``floor(p · 2³²)``."""
    return min(int(p * SEED_LIMIT), _MASK32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x · c) mod 2³²`` for int64 ``x`` in [0, 2³²): the high half of ``c`` contributes only
    its low 16 bits of product, shifted, so no intermediate exceeds 2⁴⁹."""
    hi = (x * (c >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return (x * (c & 0xFFFF)).add_(hi).bitwise_and_(_MASK32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 mixer on int64 tensors holding values in [0, 2³²) (a new tensor)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x.bitwise_xor_(x >> 15)
    x = _mul32(x, MIX_C2)
    return x.bitwise_xor_(x >> 16)


def _as_int64(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int64)
    return torch.tensor(x, dtype=torch.int64, device=device)


def row_hash(seed, bh: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``mix(mix(seed ^ mix(bh)) ^ i)`` broadcast over ``bh`` (flat query heads) and ``rows``
    (query indices): the per-row part of the hash, computed once per row, not per weight.
    ``seed`` is an int or a 0-dim int64 tensor (a seed drawn inside a ``torch.compile`` trace)."""
    seed = _as_int64(seed, bh.device)
    return mix32(mix32(mix32(bh.to(torch.int64)) ^ seed) ^ rows.to(torch.int64))


def dropped(row: torch.Tensor, cols: torch.Tensor, thresh: int) -> torch.Tensor:
    """Bool mask, True where the weight is dropped: ``mix(row ^ j) < threshold``, broadcast over
    the row hashes ``row`` (:func:`row_hash`) and the key indices ``cols``."""
    return mix32(row ^ cols.to(torch.int64)) < thresh


def keep_weights(seed, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask, True where the weight of flat head ``bh``, query ``rows`` and key ``cols``
    (broadcast together) survives dropout at rate ``p`` with ``seed``."""
    return ~dropped(row_hash(seed, bh, rows), cols, threshold(p))
