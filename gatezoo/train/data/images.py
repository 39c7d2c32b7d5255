"""Image-classification data held in memory, and a fast batch iterator over it.

``load_dataset(spec)`` returns a :class:`Dataset`: uint8 images ``(N, C, H, W)``, int64 labels
and class names for a train and a test split. ``spec`` is one of

- ``"fashion-mnist"`` (the default): the idx files the Debian package ``dataset-fashion-mnist``
  installs under ``/usr/share/datasets/fashion-mnist``;
- a directory holding the four idx files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each gzip-compressed or not; ``test-``
  is accepted for ``t10k-`` and ``.idx`` for ``-idx``);
- an ``.npz`` file with arrays ``x`` and ``y`` (and optionally ``x_test``/``y_test`` and
  ``classes``); without a test split a deterministic sixth of the examples is held out;
- an image-folder tree ``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` (any format
  PIL reads; grayscale images give one channel, colour images three).

A data set that is not there raises :class:`DataNotFoundError`, whose message says how to get
it; a file that is there but cannot be read raises :class:`DataFormatError` naming the file: a
truncated or corrupt file, a label that is negative or not below :data:`MAX_CLASSES`, an empty
train or test split (an empty test split would report an accuracy over zero images).

:class:`Batches` walks such tensors in mini-batches without worker processes: a per-epoch
shuffle from a seeded ``torch.Generator``, conversion to float normalised with the training
set's per-channel mean and std, and an optional light augmentation (random shifts of up to two
pixels and horizontal flips), off by default.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gatezoo.blocks.checks import ArgumentTypeError, check_bool, check_int

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MAX_CLASSES = 100_000
"""The most classes a data set may have: a label must lie in [0, MAX_CLASSES). A label beyond it
is almost certainly a corrupt value (it would otherwise allocate a class per value up to it)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")

HOW_TO_GET = (
    "Install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (or `make install`, "
    "which does it for you), or pass --data PATH: a directory of idx files, an .npz file with "
    "x/y arrays, or an image folder root/{train,test}/<class>/*.png."
)

# idx type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}


class DataNotFoundError(FileNotFoundError):
    """The requested data set is not on this machine; the message says how to get it."""


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (bad magic number, wrong sizes...)."""


# --------------------------------------------------------------------------------------------
# idx files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzip-compressed or plain, detected from its first bytes) into an array.

    Checks the magic number (two zero bytes, a type code, the number of dimensions) and that the
    file holds exactly the bytes its header announces; raises :class:`DataFormatError` naming
    the file otherwise. Returns a native-byte-order array of the header's shape.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as e:
            raise DataFormatError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        magic = raw[:4].hex() if len(raw) >= 4 else raw.hex() or "empty file"
        raise DataFormatError(
            f"{path}: not an idx file (magic number 0x{magic}; expected 0x0000TTNN with type code TT "
            f"in {sorted(hex(c) for c in _IDX_DTYPES)} and NN >= 1 dimensions, e.g. 0x00000803 for images)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated idx header ({len(raw)} bytes, {ndim} dimensions announced)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        raise DataFormatError(
            f"{path}: idx header announces shape {tuple(dims)} ({expected} bytes) but the file holds "
            f"{len(raw)} bytes (truncated or corrupt)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an idx file; gzip-compressed when ``path`` ends in ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64 (the idx type codes).
    """
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"array: idx files hold uint8/int8/int16/int32/float32/float64, got dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"array: idx files hold 1 to 255 dimensions, got shape {array.shape}")
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    data = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + body
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _find_idx(root: Path, split: str, kind: str, ndim: int) -> Path | None:
    prefixes = ("train",) if split == "train" else ("t10k", "test")
    for prefix in prefixes:
        for sep in ("-", "."):
            for gz in ("", ".gz"):
                p = root / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{gz}"
                if p.is_file():
                    return p
    return None


def _idx_files(root: Path) -> dict[str, Path | None]:
    return {
        "train images": _find_idx(root, "train", "images", 3),
        "train labels": _find_idx(root, "train", "labels", 1),
        "test images": _find_idx(root, "test", "images", 3),
        "test labels": _find_idx(root, "test", "labels", 1),
    }


# --------------------------------------------------------------------------------------------
# the data set


@dataclass
class Dataset:
    """A classification data set in memory: uint8 images ``(N, C, H, W)`` and int64 labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    source: str = ""
    _stats: tuple[list[float], list[float]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise DataFormatError(
                    f"{self.name}: {split} images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise DataFormatError(
                    f"{self.name}: {split} labels must be int64 (N,) with N = {len(x)} images, "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise DataFormatError(
                    f"{self.name}: {split} labels must lie in [0, {len(self.classes)}), "
                    f"got [{int(y.min())}, {int(y.max())}]"
                )
        if len(self.train_images) == 0:
            raise DataFormatError(f"{self.name}: the train split is empty")
        if len(self.test_images) == 0:
            raise DataFormatError(f"{self.source or self.name}: the test split is empty (an accuracy over zero test "
                                  f"images means nothing); give it test images")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataFormatError(
                f"{self.name}: train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} differ in shape"
            )

    @property
    def in_chans(self) -> int:
        """Number of image channels (1 for grayscale, 3 for RGB)."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width."""
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the training images, on the [0, 1] scale.

        Computed exactly from a histogram of the uint8 values (no float copy of the data set).
        """
        if self._stats is None:
            mean, std = [], []
            values = torch.arange(256, dtype=torch.float64) / 255.0
            for c in range(self.in_chans):
                hist = torch.bincount(self.train_images[:, c].reshape(-1), minlength=256).to(torch.float64)
                n = hist.sum()
                m = (hist * values).sum() / n
                var = (hist * (values - m) ** 2).sum() / n
                mean.append(float(m))
                std.append(max(float(var.sqrt()), 1e-6))
            self._stats = (mean, std)
        return self._stats

    def summary(self) -> str:
        """One line: name, split sizes, image shape and class count."""
        c, (h, w) = self.in_chans, self.image_size
        return (
            f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test images, "
            f"{c}x{h}x{w}, {self.num_classes} classes"
        )


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); (N,H,W,C) -> (N,C,H,W); (N,C,H,W) with C in {1,3,4} kept."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4):
            return x
        if x.shape[3] in (1, 3, 4):
            return x.transpose(0, 3, 1, 2)
    raise DataFormatError(
        f"{what}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1/3/4, got {x.shape}"
    )


def _to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; other integers in [0, 255]; floats in [0, 1] (scaled by 255) or [0, 255]."""
    if x.dtype == np.uint8:
        return x
    if x.size == 0:
        return x.astype(np.uint8)
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(x.dtype, np.integer) and lo >= 0 and hi <= 255:
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating) and lo >= 0 and hi <= 255:
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
    raise DataFormatError(
        f"{what}: images must be uint8, integers in [0, 255] or floats in [0, 1] / [0, 255]; "
        f"got {x.dtype} in [{lo}, {hi}]"
    )


def _labels(y: np.ndarray, n: int, what: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise DataFormatError(f"{what}: labels must be integers of shape ({n},), got {y.dtype} {y.shape}")
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise DataFormatError(f"{what}: label {y[i]} (at index {i}) is negative; labels must be class indices >= 0")
    if y.size and y.max() >= MAX_CLASSES:
        i = int(np.argmax(y))
        raise DataFormatError(f"{what}: label {y[i]} (at index {i}) is out of range: labels must be class indices in "
                              f"[0, {MAX_CLASSES}) (MAX_CLASSES); is the file corrupt?")
    return torch.from_numpy(y.astype(np.int64))


def _class_names(n: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [str(i) for i in range(n)]
    names = [str(s) for s in names]
    if len(names) < n:
        raise DataFormatError(f"the data set names {len(names)} classes but its labels go up to {n - 1}")
    return names


def _num_labels(*ys: torch.Tensor) -> int:
    return max(int(y.max()) + 1 if len(y) else 0 for y in ys)


def load_idx_dir(root: str | os.PathLike, name: str | None = None) -> Dataset:
    """Load the four idx files of an MNIST-style directory (see the module docstring)."""
    root = Path(root)
    files = _idx_files(root)
    missing = [k for k, p in files.items() if p is None]
    if missing:
        raise DataNotFoundError(
            f"{root}: no idx file for {', '.join(missing)} (expected train-images-idx3-ubyte[.gz], "
            f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]). {HOW_TO_GET}"
        )
    split = {}
    for s in ("train", "test"):
        x = read_idx(files[f"{s} images"])
        y = read_idx(files[f"{s} labels"])
        what = str(files[f"{s} images"])
        x = _to_uint8(_to_nchw(x, what), what)
        split[s] = (torch.from_numpy(np.ascontiguousarray(x)), _labels(y, len(x), str(files[f"{s} labels"])))
    n = _num_labels(split["train"][1], split["test"][1])
    name = name or root.name
    fashion = "fashion" in name.lower() and n <= len(FASHION_MNIST_CLASSES)
    return Dataset(
        name=name,
        train_images=split["train"][0],
        train_labels=split["train"][1],
        test_images=split["test"][0],
        test_labels=split["test"][1],
        classes=list(FASHION_MNIST_CLASSES) if fashion else _class_names(n, None),
        source=str(root),
    )


def holdout_split(n: int, fraction: float = 1 / 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, test) index arrays: a fixed permutation, its last ``n * fraction`` held out.

    ``n`` must be an int >= 2 and ``fraction`` a number in (0, 1)."""
    check_int("n", n, 0)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ArgumentTypeError(f"fraction must be a number in (0, 1), got {fraction!r} ({type(fraction).__name__})")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if n < 2:
        raise DataFormatError(f"need at least 2 examples to hold out a test split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, int(n * fraction)), n - 1)
    return np.sort(perm[: n - n_test]), np.sort(perm[n - n_test :])


def load_npz(path: str | os.PathLike, name: str | None = None) -> Dataset:
    """Load an ``.npz`` with ``x``/``y`` (optional ``x_test``/``y_test``, ``classes``).

    Without ``x_test``/``y_test``, :func:`holdout_split` holds out a deterministic sixth as test.
    """
    path = Path(path)
    try:
        return _load_npz(path, name)
    except DataFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # a truncated or corrupt archive fails when it is opened or when a member is read
        raise DataFormatError(f"{path}: cannot read as .npz ({type(e).__name__}: {e}); is the file truncated or "
                              f"corrupt?") from e


def _load_npz(path: Path, name: str | None) -> Dataset:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataFormatError(f"{path}: not an .npz archive (a single .npy array?); save x and y with np.savez")
    with z:
        keys = set(z.files)
        if not {"x", "y"} <= keys:
            raise DataFormatError(f"{path}: an .npz data set needs arrays 'x' and 'y', found {sorted(keys)}")
        if ("x_test" in keys) != ("y_test" in keys):
            raise DataFormatError(f"{path}: give both 'x_test' and 'y_test' or neither, found {sorted(keys)}")
        x = _to_uint8(_to_nchw(z["x"], f"{path}:x"), f"{path}:x")
        y = _labels(z["y"], len(x), f"{path}:y")
        if "x_test" in keys:
            xt = _to_uint8(_to_nchw(z["x_test"], f"{path}:x_test"), f"{path}:x_test")
            yt = _labels(z["y_test"], len(xt), f"{path}:y_test")
            if len(xt) == 0:
                raise DataFormatError(f"{path}:x_test: the test split is empty; drop x_test/y_test to hold out a "
                                      f"sixth of x as test")
        else:
            tr, te = holdout_split(len(x))
            x, xt = x[tr], x[te]
            y, yt = y[torch.from_numpy(tr)], y[torch.from_numpy(te)]
        names = z["classes"].tolist() if "classes" in keys else None
    return Dataset(
        name=name or path.stem,
        train_images=torch.from_numpy(np.ascontiguousarray(x)),
        train_labels=y,
        test_images=torch.from_numpy(np.ascontiguousarray(xt)),
        test_labels=yt,
        classes=_class_names(_num_labels(y, yt), names),
        source=str(path),
    )


def _image_split_dirs(root: Path) -> tuple[Path, Path] | None:
    train = root / "train"
    test = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    return (train, test) if train.is_dir() and test is not None else None


def load_image_folder(root: str | os.PathLike, name: str | None = None) -> Dataset:
    """Load ``root/{train,test}/<class>/<image>`` (``val`` is accepted for ``test``) with PIL.

    Classes are the sorted sub-directory names of ``train``. All images must share one size;
    if any image is in colour every image is converted to RGB, else all are read as grayscale.
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - torchvision brings Pillow
        raise ImportError("image-folder data sets need Pillow: pip install pillow") from e
    root = Path(root)
    dirs = _image_split_dirs(root)
    if dirs is None:
        raise DataNotFoundError(
            f"{root}: an image-folder data set needs sub-directories train/ and test/. {HOW_TO_GET}"
        )
    classes = sorted(p.name for p in dirs[0].iterdir() if p.is_dir())
    if not classes:
        raise DataFormatError(f"{dirs[0]}: no class sub-directories")
    unknown = sorted(p.name for p in dirs[1].iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise DataFormatError(f"{dirs[1]}: classes {unknown} do not appear in {dirs[0]}")

    listing = {}
    for split, d in zip(("train", "test"), dirs):
        listing[split] = [
            (f, i)
            for i, c in enumerate(classes)
            if (d / c).is_dir()
            for f in sorted((d / c).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    for split, d in zip(("train", "test"), dirs):
        if not listing[split]:
            raise DataFormatError(f"{d}: no images in the {split} split (expected {d}/<class>/<image> with a suffix "
                                  f"of {', '.join(IMAGE_SUFFIXES)})")

    gray_modes = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
    images, size, color = {}, None, False
    for split, files in listing.items():
        loaded = []
        for f, _ in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    if im.mode == "P":
                        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                        if not _is_gray(im):
                            color = True
                        else:
                            im = im.convert("L")
                    elif im.mode not in gray_modes:
                        color = True
                    if size is None:
                        size = im.size
                    elif im.size != size:
                        raise DataFormatError(f"{f}: image size {im.size} differs from the first image's {size}")
                    loaded.append(im.copy())
            except DataFormatError:
                raise
            except OSError as e:
                raise DataFormatError(f"{f}: cannot read image ({e})") from e
        images[split] = loaded

    mode, chans = ("RGB", 3) if color else ("L", 1)
    out = {}
    for split, loaded in images.items():
        arr = np.zeros((len(loaded), chans, size[1], size[0]), dtype=np.uint8)
        for k, im in enumerate(loaded):
            a = np.asarray(im.convert(mode), dtype=np.uint8)
            arr[k] = a[None] if chans == 1 else a.transpose(2, 0, 1)
        labels = torch.tensor([i for _, i in listing[split]], dtype=torch.int64)
        out[split] = (torch.from_numpy(arr), labels)
    return Dataset(
        name=name or root.name,
        train_images=out["train"][0],
        train_labels=out["train"][1],
        test_images=out["test"][0],
        test_labels=out["test"][1],
        classes=classes,
        source=str(root),
    )


def _is_gray(im) -> bool:
    a = np.asarray(im.convert("RGB"))
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def load_dataset(data: str | os.PathLike = FASHION_MNIST) -> Dataset:
    """Load a data set from a name or path (see the module docstring for what ``data`` may be)."""
    if not isinstance(data, (str, os.PathLike)):
        raise ArgumentTypeError(f"data must be 'fashion-mnist' or a path (str or os.PathLike), got {data!r} "
                                f"({type(data).__name__})")
    if not str(data):
        raise ValueError(f"data must be 'fashion-mnist' or a path, got {data!r}")
    spec = str(data)
    if spec.lower().replace("_", "-") in (FASHION_MNIST, "fashionmnist"):
        if not all(_idx_files(FASHION_MNIST_DIR).values()):
            raise DataNotFoundError(f"Fashion-MNIST is not installed (looked in {FASHION_MNIST_DIR}). {HOW_TO_GET}")
        return load_idx_dir(FASHION_MNIST_DIR, name=FASHION_MNIST)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"data set {spec!r} not found: no such file or directory. {HOW_TO_GET}")
    if path.is_dir():
        if any(_idx_files(path).values()):
            name = FASHION_MNIST if path.resolve() == FASHION_MNIST_DIR.resolve() else None
            return load_idx_dir(path, name=name)
        if _image_split_dirs(path) is not None:
            return load_image_folder(path)
        raise DataNotFoundError(
            f"{path}: neither idx files (train-images-idx3-ubyte[.gz] ...) nor train/ and test/ image folders. "
            f"{HOW_TO_GET}"
        )
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    raise DataFormatError(
        f"{path}: unsupported data file (expected an .npz, a directory of idx files or an image folder)"
    )


# --------------------------------------------------------------------------------------------
# batches


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, epoch, batch...) with numpy's SeedSequence."""
    seq = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    return int(seq.generate_state(1, np.uint64)[0] >> 1)


class Batches:
    """Mini-batches ``(float images (B, C, H, W), int64 labels (B,))`` from uint8 tensors in memory.

    The uint8 data is moved to ``device`` once; each batch is indexed, converted to float and
    normalised there (``(x / 255 - mean) / std`` per channel). With ``shuffle`` each epoch walks
    a permutation drawn from a ``torch.Generator`` seeded with ``(seed, epoch)``, so an epoch's
    order depends only on those two numbers and a resumed run can skip ahead (``start``).
    ``augment`` applies a random shift of up to ``shift`` pixels (zero padding) and a horizontal
    flip with probability 1/2, drawn per batch from a generator seeded with
    ``(seed, epoch, batch index)``.

    Every argument is checked (TypeError for a wrong type, ValueError for a wrong value, each
    naming the argument): ``images`` a uint8 (N, C, H, W) tensor, ``labels`` an integer (N,)
    tensor, ``batch_size`` a positive int, ``mean`` and ``std`` C finite numbers (std > 0), the
    flags actual bools.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        shift: int = 2,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ):
        if not isinstance(images, torch.Tensor):
            raise ArgumentTypeError(f"images must be a uint8 (N, C, H, W) tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise ArgumentTypeError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                                    f"{tuple(images.shape)}")
        if images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ArgumentTypeError(f"labels must be an integer tensor of class indices, got {got}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ArgumentTypeError(f"batch_size must be a positive integer, got {batch_size!r} "
                                    f"({type(batch_size).__name__})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        c = images.shape[1]
        for what, values in (("mean", mean), ("std", std)):
            if isinstance(values, (str, bytes)) or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
                raise ArgumentTypeError(f"{what} must be a sequence of {c} numbers, got {values!r}")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{what} must hold finite numbers, got {list(values)}")
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise ValueError(f"mean and std must hold {c} values (std > 0), got mean={list(mean)}, std={list(std)}")
        for what, flag in (("shuffle", shuffle), ("augment", augment), ("drop_last", drop_last)):
            check_bool(what, flag)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ArgumentTypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
        check_int("shift", shift, 0)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle, self.seed, self.augment, self.shift, self.drop_last = shuffle, seed, augment, shift, drop_last
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The example order of ``epoch`` (a permutation when shuffling, else 0..N-1)."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0x5EED))
        return torch.randperm(n, generator=g)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, beginning at batch index ``start`` (0 <= start <= len; checked
        here, not at the first batch)."""
        check_int("epoch", epoch, 0)
        check_int("start", start, 0)
        if start > len(self):
            raise ValueError(f"start must be a batch index in [0, {len(self)}], got {start}")
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch).to(self.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = self._augment(x, derive_seed(self.seed, epoch, b, 0xA06))
            yield x.float().mul_(self._scale).sub_(self._shift), self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def _augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        b, _, h, w = x.shape
        p = self.shift
        if p:
            dy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
            x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous()
