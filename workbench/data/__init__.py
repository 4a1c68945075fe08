"""Datasets: one registry, one ``load`` returning seed-fixed splits plus metadata.

Everything is held in memory as ``uint8`` images (N, C, H, W): the workbench's datasets
are small (28-32 px), and batching straight from a tensor with augmentation done on the
whole batch is several times faster on a 2-core CPU than a per-sample DataLoader.

Registered names (``workbench data list``):

* ``fashion-mnist-mini`` (default): 10,000 train / 2,000 test real Fashion-MNIST images,
  class balanced, committed under ``data/`` and checksum-verified on load.
* ``fashion-mnist``: the full 70,000 images from the official IDX ``.gz`` files.
* ``digits``: scikit-learn's 1,797 8x8 digits.
* ``cifar10`` / ``cifar100``: torchvision's loaders; downloaded only when asked.
* ``imagefolder:PATH``: any folder of class sub-folders.
"""


from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import ConfigError
from .pipeline import (  # noqa: F401
    INTERPOLATIONS,
    augment_batch,
    batches,
    epoch_generator,
    match_recorded_pipeline,
    normalize,
    num_batches,
    resize_center_crop,
    with_input_pipeline,
)
from .sources import (  # noqa: F401
    DATASETS,
    FASHION_CLASSES,
    FASHION_MNIST_FILES,
    MINI_FILE,
    MINI_SHA256,
    SYSTEM_FASHION_MNIST_DIR,
    default_data_dir,
    find_fashion_mnist_dir,
    load_imagefolder,
    read_idx,
    sha256_file,
    verify_checksum,
)
from .splits import DataBundle, DataInfo, ImageSplit  # noqa: F401

# ---------------------------------------------------------------------------------------
# Public entry points


def list_datasets() -> list[str]:
    """Registered dataset names (``imagefolder:PATH`` takes a path after the colon)."""
    return DATASETS.names() + ["imagefolder:PATH"]


def load(name: str = "fashion-mnist-mini", *, data_dir: str | Path | None = None, seed: int = 0,
         n_calib: int = 512, val_size: int | float = 0, download: bool = False,
         image_size: int | None = None) -> DataBundle:
    """Load a registered dataset into memory with seed-fixed splits.

    Args:
        name: a registered name (see :func:`list_datasets`) or ``imagefolder:PATH``.
        data_dir: where datasets live (default :func:`default_data_dir`).
        seed: fixes the validation and calibration subsets.
        n_calib: calibration images, drawn from the training split (after ``val`` is carved).
        val_size: training images held out as ``val``: a fraction in (0, 1), or a count (a whole
            number, at least 1 and below the training set size); 0 = no validation split.
        download: allow torchvision to download (fashion-mnist, cifar10, cifar100).
        image_size: resize for ``imagefolder`` (default: the first image's size).

    Raises:
        UnknownNameError: unknown dataset (lists valid names).
        DataError: data missing, corrupt or unreadable; the message says how to get it.
        ConfigError: ``n_calib`` < 0, or ``val_size`` not a valid fraction or count (see
            :func:`val_count`).
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name.startswith("imagefolder:"):
        info, train, test = load_imagefolder(Path(name.split(":", 1)[1]), image_size=image_size, seed=seed)
    else:
        loader = DATASETS.get(name)
        info, train, test = loader(data_dir=data_dir, download=download)
    if n_calib < 0:
        raise ConfigError(f"n_calib must be >= 0, got {n_calib}")
    n_val = val_count(val_size, len(train))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train), generator=gen)
    val = train.subset(perm[:n_val].sort().values)
    train = train.subset(perm[n_val:].sort().values) if n_val else train
    calib_idx = torch.randperm(len(train), generator=gen)[: min(n_calib, len(train))].sort().values
    calib = train.subset(calib_idx)
    return DataBundle(info, train, test, calib, val, seed=seed,
                      params={"name": name, "seed": seed, "n_calib": n_calib, "val_size": val_size})


def val_count(val_size: int | float, n_train: int) -> int:
    """How many of ``n_train`` training images ``val_size`` holds out.

    A value in (0, 1) is a fraction (rounded to whole images, at least one); a whole number
    ``>= 1`` (``200`` or ``200.0``) is a count, which must leave training images; ``0`` means none.

    Raises:
        ConfigError: a negative value, a non-whole value ``>= 1`` (``1.5``: a fraction must be
            below 1), a count ``>= n_train``, or a fraction that leaves no training images. The
            message gives the training set size and the valid range.
    """
    valid = (f"use a fraction in (0, 1) or a whole number of images from 1 to {n_train - 1} "
             f"(the training set has {n_train} images), or 0 for no validation split")
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or math.isnan(val_size):
        raise ConfigError(f"val_size must be a number, got {val_size!r}: {valid}")
    if val_size < 0:
        raise ConfigError(f"val_size={val_size} is negative: {valid}")
    if val_size == 0:
        return 0
    if val_size < 1:
        n_val = max(1, int(round(val_size * n_train)))
    elif float(val_size).is_integer():
        n_val = int(val_size)
    else:
        raise ConfigError(f"val_size={val_size} is neither a fraction (below 1) nor a whole number of images: {valid}")
    if n_val >= n_train:
        raise ConfigError(f"val_size={val_size} would hold out {n_val} of the {n_train} training images and "
                          f"leave none to train on: {valid}")
    return n_val
