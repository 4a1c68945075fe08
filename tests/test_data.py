import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from workbench import data
from workbench.errors import ConfigError, DataError, UnknownNameError


def test_mini_shapes_labels_and_balance(mini):
    assert mini.info.image_size == 28 and mini.info.channels == 1 and mini.info.num_classes == 10
    assert mini.train.images.shape == (10000, 1, 28, 28) and mini.train.images.dtype == torch.uint8
    assert mini.test.images.shape == (2000, 1, 28, 28)
    assert torch.equal(torch.bincount(mini.train.labels), torch.full((10,), 1000))
    assert torch.equal(torch.bincount(mini.test.labels), torch.full((10,), 200))
    assert len(mini.info.class_names) == 10 and mini.info.class_names[9] == "Ankle boot"
    # real images, not noise: mean brightness close to Fashion-MNIST's published mean
    assert abs(mini.train.images.float().mean().item() / 255 - 0.286) < 0.01


def test_calib_and_val_are_seed_fixed_subsets_of_train():
    a = data.load("fashion-mnist-mini", seed=3, n_calib=100, val_size=0.1)
    b = data.load("fashion-mnist-mini", seed=3, n_calib=100, val_size=0.1)
    c = data.load("fashion-mnist-mini", seed=4, n_calib=100, val_size=0.1)
    assert len(a.val) == 1000 and len(a.train) == 9000 and len(a.calib) == 100
    assert torch.equal(a.calib.images, b.calib.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    # calibration images come from the training split, never from val or test
    train_set = {bytes(x.numpy()) for x in a.train.images}
    assert all(bytes(x.numpy()) in train_set for x in a.calib.images)
    assert not any(bytes(x.numpy()) in train_set for x in a.val.images[:50])


def test_checksum_failure_is_reported(tmp_path):
    src = data.default_data_dir() / data.MINI_FILE
    bad = tmp_path / data.MINI_FILE
    shutil.copy(src, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt\x00")
    with pytest.raises(DataError, match="checksum mismatch"):
        data.load("fashion-mnist-mini", data_dir=tmp_path)


def test_missing_full_dataset_message_names_the_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data.sources, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as e:
        data.load("fashion-mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "workbench data download" in msg


def test_cifar_offline_message(tmp_path):
    with pytest.raises(DataError, match="workbench data download cifar10"):
        data.load("cifar10", data_dir=tmp_path)


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_full_fashion_mnist_reader_on_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    x_tr, y_tr = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 10, 30)
    x_te, y_te = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    for name, arr in zip(data.FASHION_MNIST_FILES, (x_tr, y_tr, x_te, y_te)):
        _write_idx(folder / name, arr)
    b = data.load("fashion-mnist", data_dir=tmp_path, n_calib=5)
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(x_tr.astype(np.uint8)))
    assert torch.equal(b.test.labels, torch.from_numpy(y_te))
    # a truncated file is reported, not a reshape traceback
    with gzip.open(folder / data.FASHION_MNIST_FILES[2], "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 12, 28, 28) + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        data.load("fashion-mnist", data_dir=tmp_path)


def test_digits_and_unknown_names():
    b = data.load("digits", n_calib=64)
    assert b.info.image_size == 8 and len(b.train) + len(b.test) == 1797 and not b.info.hflip
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        data.load("fashion_mnist")


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    b = data.load(f"imagefolder:{tmp_path}", image_size=8, n_calib=4)
    assert b.info.class_names == ("cat", "dog") and b.info.channels == 3 and b.info.image_size == 8
    assert len(b.train) == 16 and len(b.test) == 4 and b.train.images.shape[1:] == (3, 8, 8)
    with pytest.raises(DataError, match="not a directory"):
        data.load(f"imagefolder:{tmp_path / 'missing'}")


def test_batches_order_augmentation_and_resume(mini):
    split = mini.train.subset(torch.arange(300))
    full = list(data.batches(split, mini.info, 64, shuffle=True, augment=True, seed=1, epoch=2))
    again = list(data.batches(split, mini.info, 64, shuffle=True, augment=True, seed=1, epoch=2))
    resumed = list(data.batches(split, mini.info, 64, shuffle=True, augment=True, seed=1, epoch=2, start_batch=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    assert len(resumed) == len(full) - 2 and torch.equal(resumed[0][0], full[2][0])
    other = next(data.batches(split, mini.info, 64, shuffle=True, augment=True, seed=1, epoch=3))
    assert not torch.equal(other[1], full[0][1])
    x, _ = next(data.batches(split, mini.info, 300))
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2   # normalized


def test_augment_is_a_shifted_or_flipped_copy(mini):
    img = mini.train.images[:1]
    g = torch.Generator().manual_seed(0)
    pad = 3
    out = data.augment_batch(img.repeat(16, 1, 1, 1), mini.info, g, padding=pad)
    padded = torch.nn.functional.pad(img, (pad,) * 4)[0, 0]
    for o in out[:, 0]:
        found = any(torch.equal(o, cand) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                    for cand in (padded[dy:dy + 28, dx:dx + 28], padded[dy:dy + 28, dx:dx + 28].flip(-1)))
        assert found


def test_val_count_semantics():
    # a value in (0, 1) is a fraction (at least one image); a whole number >= 1 is a count
    assert data.val_count(0, 100) == 0 and data.val_count(0.0, 100) == 0
    assert data.val_count(0.25, 100) == 25 and data.val_count(0.001, 100) == 1
    assert data.val_count(30, 100) == 30 and data.val_count(30.0, 100) == 30  # e.g. from JSON
    assert data.val_count(99, 100) == 99
    for bad, words in [(1.5, "neither a fraction"), (2.5, "neither a fraction"), (-1, "negative"),
                       (-0.1, "negative"), (100, "leave none"), (250, "leave none"), (0.999, "leave none"),
                       (float("nan"), "must be a number"), ("10", "must be a number"), (True, "must be a number")]:
        with pytest.raises(ConfigError, match=words) as e:
            data.val_count(bad, 100)
        # every message gives the training set size and the valid range
        assert "100 images" in str(e.value) and "1 to 99" in str(e.value), bad


def test_bad_parameters():
    with pytest.raises(ConfigError, match="the training set has 10000 images"):
        data.load("fashion-mnist-mini", val_size=20000)
    with pytest.raises(ConfigError, match="neither a fraction"):
        data.load("fashion-mnist-mini", val_size=2.5)
    with pytest.raises(ConfigError, match="negative"):
        data.load("fashion-mnist-mini", val_size=-5)
    with pytest.raises(ConfigError):
        data.load("fashion-mnist-mini", n_calib=-1)
