"""Test set-up: Triton kernels run through the CPU interpreter, and fresh buffers start as NaN.

TRITON_INTERPRET must be set before anything imports triton, hence at the top of conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_empty, _empty_like = torch.empty, torch.empty_like


def _nan_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _nan_empty_like(*args, **kwargs):
    t = _empty_like(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Every torch.empty / torch.empty_like buffer starts as NaN, so an output element a kernel
    forgot to write cannot pass a comparison by luck."""
    monkeypatch.setattr(torch, "empty", _nan_empty)
    monkeypatch.setattr(torch, "empty_like", _nan_empty_like)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
