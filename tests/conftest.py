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


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """8x8 grayscale images of 3 classes (a bright band whose row gives the class): 64 train, 24 test."""
    import numpy as np

    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
        for i in range(n):
            x[i, 2 * y[i] : 2 * y[i] + 3] += 150
        return x, y

    (x, y), (xt, yt) = make(64), make(24)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return path


WORDS_EN = "the a king man woman house of god land water light day night and said unto".split()
WORDS_ES = "el la rey hombre mujer casa de dios tierra agua luz dia noche y dijo a".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """160 word-for-word 'translations' (a word list mapped through a dictionary): train.en, train.es."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus")
    src, tgt = [], []
    for _ in range(160):
        idx = [rng.randrange(len(WORDS_EN)) for _ in range(rng.randint(2, 7))]
        src.append(" ".join(WORDS_EN[i] for i in idx))
        tgt.append(" ".join(WORDS_ES[i] for i in idx))
    (path / "train.en").write_text("\n".join(src) + "\n")
    (path / "train.es").write_text("\n".join(tgt) + "\n")
    return path
