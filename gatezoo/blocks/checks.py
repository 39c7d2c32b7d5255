"""Argument checks shared by the blocks, the models and the data loaders.

The rule every public constructor and forward follows: a wrong type raises
:class:`ArgumentTypeError` (a TypeError), a wrong value or shape raises ValueError, and the
message names the argument and says what was expected, e.g. ``"channels_hidden must be a
positive int, got 0"``. Nothing is silently replaced by a default: ``0`` is not "use the
default size", ``"false"`` is not a bool, ``2.0`` is not a size.
"""

from __future__ import annotations

import math
import numbers

import torch

from gatezoo.kernels import BACKENDS


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a str where a bool belongs, a float where a size belongs,
    integer images where normalised floats belong...).

    A TypeError, and also a ValueError, so the code that turns a config's ValueError into a
    clear command-line error (the training commands) still catches it."""


def _type(value) -> str:
    return type(value).__name__


def _int_phrase(minimum: int) -> str:
    return {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, checked to be an integer (not a bool, not a float) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be {_int_phrase(minimum)}, got {value!r} ({_type(value)})")
    if value < minimum:
        raise ValueError(f"{name} must be {_int_phrase(minimum)}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value, minimum: int = 1) -> int | None:
    """:func:`check_int`, with None passed through (None, not 0, asks for the default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be {_int_phrase(minimum)} or None for the default, got {value!r} "
                                f"({_type(value)})")
    return check_int(name, value, minimum)


def check_bool(name: str, value) -> bool:
    """``value``, checked to be an actual bool (the string ``"false"`` is not false)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be true or false (a bool), got {value!r} ({_type(value)})")
    return value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_probability(name: str, value) -> float:
    """A dropout rate: a number in [0, 1) (1 would drop everything)."""
    if not _is_number(value):
        raise ArgumentTypeError(f"{name} must be a number in [0, 1), got {value!r} ({_type(value)})")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    """A finite number > 0 (an eps, a scale)."""
    if not _is_number(value):
        raise ArgumentTypeError(f"{name} must be a finite number > 0, got {value!r} ({_type(value)})")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value) -> float:
    """A finite number >= 0."""
    if not _is_number(value):
        raise ArgumentTypeError(f"{name} must be a finite number >= 0, got {value!r} ({_type(value)})")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_str(name: str, value, *, optional: bool = False) -> str | None:
    """``value``, checked to be a str (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        extra = " or None" if optional else ""
        raise ArgumentTypeError(f"{name} must be a str{extra}, got {value!r} ({_type(value)})")
    return value


def check_backend(backend) -> str:
    """A kernel backend name of :data:`gatezoo.kernels.BACKENDS`, checked when a block is built
    rather than at its first forward."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_float_tensor(name: str, x, hint: str = "") -> torch.Tensor:
    """``x``, checked to be a floating-point tensor (``hint`` is added to the dtype error)."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {_type(x)}")
    if not x.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor{hint}, got {x.dtype}")
    return x


def check_dtype(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    """Outside autocast, ``x`` must have the dtype of the parameter ``like`` (the matmul or
    convolution would fail with a PyTorch error otherwise)."""
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ArgumentTypeError(f"{name} has dtype {x.dtype} but the module's parameters are {like.dtype}; convert "
                                f"the input ({name}.to({like.dtype})) or the module, or run under torch.autocast")


def check_features(name: str, x, width: int, what: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x``, checked to be a floating-point tensor (..., width); ``what`` names the constructor
    argument that fixed ``width`` (``in_features``, ``dim``). With ``like``, also the dtype of
    that parameter (see :func:`check_dtype`)."""
    check_float_tensor(name, x)
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{name} must have {width} features in its last dimension ({what}={width}), got shape "
                         f"{tuple(x.shape)}")
    if like is not None:
        check_dtype(name, x, like)
    return x


def check_index(name: str, index, size: int) -> torch.Tensor:
    """``index``, checked to be a 1-D integer tensor of rows in [0, size) (for ``reorder`` and
    ``select``)."""
    if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex() \
            or index.dtype == torch.bool:
        got = index.dtype if isinstance(index, torch.Tensor) else _type(index)
        raise ArgumentTypeError(f"{name} must be a 1-D integer tensor of row numbers, got {got}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of row numbers, got shape {tuple(index.shape)}")
    if index.numel():
        lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one device sync for both
        if lo < 0 or hi >= size:
            raise ValueError(f"{name} must hold row numbers in [0, {size}), got min {lo}, max {hi}")
    return index
