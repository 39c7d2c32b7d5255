"""Data loading (idx, npz, image folders, the Debian Fashion-MNIST files) and the batch iterator."""

import gzip

import numpy as np
import pytest
import torch

from gatezoo.train.data import images as gdata
from gatezoo.train.data.images import (
    Batches,
    DataFormatError,
    DataNotFoundError,
    holdout_split,
    load_dataset,
    read_idx,
    write_idx,
)


def _images(rng, n, h=6, w=5, c=None):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(path, arr)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)


def test_idx_header_is_the_standard_one(tmp_path):
    write_idx(tmp_path / "x", np.arange(6, dtype=np.uint8).reshape(2, 3))
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x02" and raw[4:12] == b"\x00\x00\x00\x02\x00\x00\x00\x03" and len(raw) == 18


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataFormatError, match="magic number 0x12340801"):
        read_idx(bad)
    short = tmp_path / "short"
    write_idx(short, np.zeros((4, 3), np.uint8))
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(DataFormatError, match=r"announces shape \(4, 3\).*truncated"):
        read_idx(short)
    gz = tmp_path / "broken.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(DataFormatError, match="corrupt gzip"):
        read_idx(gz)
    with pytest.raises(ValueError, match="array: idx files hold"):
        write_idx(tmp_path / "u16", np.zeros(3, np.uint16))


def _write_idx_dir(root, rng, n_train=12, n_test=5, gz=True, test_prefix="t10k", sep="-"):
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train": (_images(rng, n_train), rng.integers(0, 4, n_train).astype(np.uint8)),
        test_prefix: (_images(rng, n_test), rng.integers(0, 4, n_test).astype(np.uint8)),
    }
    ext = ".gz" if gz else ""
    for prefix, (x, y) in arrays.items():
        write_idx(root / f"{prefix}-images{sep}idx3-ubyte{ext}", x)
        write_idx(root / f"{prefix}-labels{sep}idx1-ubyte{ext}", y)
    return arrays


@pytest.mark.parametrize("gz,test_prefix,sep", [(True, "t10k", "-"), (False, "test", "."), (True, "t10k", ".")])
def test_idx_directory(tmp_path, gz, test_prefix, sep):
    arrays = _write_idx_dir(tmp_path / "digits", np.random.default_rng(0), gz=gz, test_prefix=test_prefix, sep=sep)
    ds = load_dataset(tmp_path / "digits")
    assert ds.name == "digits"
    assert ds.train_images.shape == (12, 1, 6, 5) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (5, 1, 6, 5)
    assert ds.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays[test_prefix][1])
    n = max(arrays["train"][1].max(), arrays[test_prefix][1].max()) + 1
    assert ds.classes == [str(i) for i in range(n)]
    assert (ds.in_chans, ds.image_size) == (1, (6, 5))


def test_idx_directory_with_a_file_missing(tmp_path):
    _write_idx_dir(tmp_path / "d", np.random.default_rng(0))
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="no idx file for test labels"):
        load_dataset(tmp_path / "d")


def test_idx_labels_must_match_images(tmp_path):
    _write_idx_dir(tmp_path / "d", np.random.default_rng(0))
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataFormatError, match=r"labels must be integers of shape \(12,\)"):
        load_dataset(tmp_path / "d")


def test_npz_with_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x, xt = _images(rng, 20, c=3), _images(rng, 7, c=3)  # NHWC
    y, yt = rng.integers(0, 3, 20), rng.integers(0, 3, 7)
    np.savez(tmp_path / "rgb.npz", x=x, y=y, x_test=xt, y_test=yt, classes=np.array(["a", "b", "c"]))
    ds = load_dataset(str(tmp_path / "rgb.npz"))
    assert ds.name == "rgb" and ds.classes == ["a", "b", "c"]
    assert ds.train_images.shape == (20, 3, 6, 5) and ds.test_images.shape == (7, 3, 6, 5)
    np.testing.assert_array_equal(ds.train_images.numpy(), x.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.test_labels.numpy(), yt)


def test_npz_holdout_is_deterministic_sixth(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((60, 4, 4)).astype(np.float32)  # floats in [0, 1] are scaled by 255
    y = np.arange(60) % 5
    np.savez(tmp_path / "f.npz", x=x, y=y)
    a, b = load_dataset(tmp_path / "f.npz"), load_dataset(tmp_path / "f.npz")
    assert len(a.train_labels) == 50 and len(a.test_labels) == 10
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.test_labels, b.test_labels)
    tr, te = holdout_split(60)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))
    np.testing.assert_array_equal(a.test_labels.numpy(), y[te])
    np.testing.assert_array_equal(a.train_images[:, 0].numpy(), np.rint(x[tr] * 255).astype(np.uint8))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "k.npz", images=np.zeros((4, 2, 2), np.uint8), y=np.zeros(4, int))
    with pytest.raises(DataFormatError, match="needs arrays 'x' and 'y'"):
        load_dataset(tmp_path / "k.npz")
    np.savez(tmp_path / "r.npz", x=np.full((4, 2, 2), 300, np.int32), y=np.zeros(4, int))
    with pytest.raises(DataFormatError, match=r"integers in \[0, 255\]"):
        load_dataset(tmp_path / "r.npz")
    np.savez(tmp_path / "l.npz", x=np.zeros((4, 2, 2), np.uint8), y=np.zeros(5, int))
    with pytest.raises(DataFormatError, match=r"shape \(4,\)"):
        load_dataset(tmp_path / "l.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="cannot read"):
        load_dataset(tmp_path / "junk.npz")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataFormatError, match="unsupported data file"):
        load_dataset(tmp_path / "x.csv")


def _write_folder(root, rng, mode="L", size=(5, 4), classes=("cat", "dog"), per_class=3):
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / split / c / f"{k}.png")


def test_image_folder_gray_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    _write_folder(tmp_path / "gray", rng, "L")
    ds = load_dataset(tmp_path / "gray")
    assert ds.classes == ["cat", "dog"] and ds.in_chans == 1
    assert ds.train_images.shape == (6, 1, 4, 5) and ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "gray" / "train" / "cat" / "0.png"))
    np.testing.assert_array_equal(ds.train_images[0, 0].numpy(), first)

    _write_folder(tmp_path / "rgb", rng, "RGB")
    ds = load_dataset(tmp_path / "rgb")
    assert ds.train_images.shape == (6, 3, 4, 5) and ds.test_images.shape == (6, 3, 4, 5)
    first = np.asarray(Image.open(tmp_path / "rgb" / "test" / "dog" / "2.png"))
    np.testing.assert_array_equal(ds.test_images[5].numpy(), first.transpose(2, 0, 1))


def test_image_folder_errors(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    _write_folder(tmp_path / "a", rng)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "a" / "train" / "dog" / "odd.png")
    with pytest.raises(DataFormatError, match=r"odd.png: image size \(9, 9\) differs"):
        load_dataset(tmp_path / "a")
    _write_folder(tmp_path / "b", rng)
    (tmp_path / "b" / "test" / "bird").mkdir()
    with pytest.raises(DataFormatError, match=r"classes \['bird'\] do not appear"):
        load_dataset(tmp_path / "b")
    (tmp_path / "c" / "train").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="neither idx files"):
        load_dataset(tmp_path / "c")


def test_missing_data_message(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset(tmp_path / "nowhere.npz")
    msg = str(e.value)
    assert "not found" in msg and "sudo apt-get install dataset-fashion-mnist" in msg
    assert "make install" in msg and "--data PATH" in msg
    monkeypatch.setattr(gdata, "FASHION_MNIST_DIR", tmp_path / "empty")
    with pytest.raises(DataNotFoundError, match="Fashion-MNIST is not installed.*sudo apt-get install"):
        load_dataset("fashion-mnist")
    with pytest.raises(ValueError, match="data must be"):
        load_dataset("")


def test_mean_std_exact(tmp_path):
    rng = np.random.default_rng(0)
    x = _images(rng, 9, c=3)
    np.savez(tmp_path / "s.npz", x=x, y=np.zeros(9, int), x_test=x[:2], y_test=np.zeros(2, int))
    mean, std = load_dataset(tmp_path / "s.npz").mean_std()
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-10)


def _batches(n=23, **kw):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 3, 3).contiguous()
    y = torch.arange(n)
    return Batches(x, y, 5, mean=[0.0], std=[1.0 / 255], **kw)  # normalised value = pixel value


def test_batches_cover_each_example_once_and_normalise():
    b = _batches()
    assert len(b) == 5 and len(_batches(drop_last=True)) == 4
    seen = []
    for x, y in b:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 3, 3)
        torch.testing.assert_close(x[:, 0, 0, 0], y.float())
        seen += y.tolist()
    assert seen == list(range(23))  # no shuffle: in order


def test_batches_shuffle_is_seeded_per_epoch():
    b, b2, other = _batches(shuffle=True, seed=3), _batches(shuffle=True, seed=3), _batches(shuffle=True, seed=4)
    e0 = torch.cat([y for _, y in b.epoch(0)])
    assert sorted(e0.tolist()) == list(range(23)) and e0.tolist() != list(range(23))
    assert torch.equal(e0, torch.cat([y for _, y in b2.epoch(0)]))
    assert not torch.equal(e0, torch.cat([y for _, y in b.epoch(1)]))
    assert not torch.equal(e0, torch.cat([y for _, y in other.epoch(0)]))
    tail = torch.cat([y for _, y in b.epoch(1, start=2)])
    assert torch.equal(tail, torch.cat([y for _, y in b.epoch(1)])[10:])


def test_batches_augment_is_light_and_reproducible():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(1, 256, (16, 2, 8, 8), dtype=np.uint8))
    y = torch.zeros(16, dtype=torch.int64)
    kw = dict(mean=[0.0, 0.0], std=[1 / 255, 1 / 255], seed=1)
    plain = next(iter(Batches(x, y, 16, **kw)))[0]
    a1 = next(Batches(x, y, 16, augment=True, **kw).epoch(2))[0]
    a2 = next(Batches(x, y, 16, augment=True, **kw).epoch(2))[0]
    assert torch.equal(a1, a2) and a1.shape == plain.shape and not torch.equal(a1, plain)
    # each augmented image is its original shifted by at most 2 px and maybe flipped (zeros fill the border)
    for i in range(16):
        ok = False
        for img in (plain[i], plain[i].flip(-1)):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    ref = torch.zeros_like(img)
                    ys, yd = slice(max(dy, 0), 8 + min(dy, 0)), slice(max(-dy, 0), 8 + min(-dy, 0))
                    xs, xd = slice(max(dx, 0), 8 + min(dx, 0)), slice(max(-dx, 0), 8 + min(-dx, 0))
                    ref[:, yd, xd] = img[:, ys, xs]
                    ok = ok or torch.equal(a1[i], ref)
        assert ok, f"image {i} is not a shift/flip of its original"


def test_batches_errors():
    x, y = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="images must be a uint8"):
        Batches(x.float(), y, 2, mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Batches(x, y, 0, mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="mean and std must hold 1 values"):
        Batches(x, y, 2, mean=[0.0, 0.0], std=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        Batches(x, y[:3], 2, mean=[0.0], std=[1.0])


FASHION = gdata.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not FASHION.is_file(), reason=f"Fashion-MNIST not installed ({FASHION} absent; "
                    "sudo apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist"
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.num_classes == 10
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    mean, std = ds.mean_std()
    assert abs(mean[0] - 0.2860) < 1e-3 and abs(std[0] - 0.3530) < 1e-3
