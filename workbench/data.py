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

import gzip
import hashlib
import logging
import math
import os
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import shard_bounds
from .errors import ConfigError, DataError
from .registry import Registry

log = logging.getLogger(__name__)

#: SHA-256 of data/fashion-mnist-mini.npz (made by data/make_fashion_mnist_mini.py).
MINI_SHA256 = "900e50a710e706116f6ceafcd3875809ace4f251a4a1742cd3da030f95c9b57f"
MINI_FILE = "fashion-mnist-mini.npz"
#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

DATASETS: Registry[Callable[..., tuple[DataInfo, ImageSplit, ImageSplit]]] = Registry("dataset")


@dataclass(frozen=True)
class DataInfo:
    """What a model and the batching code need to know about a dataset."""

    name: str
    image_size: int
    channels: int
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Whether a horizontal flip keeps the label (clothes: yes; digits: no).
    hflip: bool = True
    source: str = ""
    licence: str = ""
    #: Set when the model's input differs from the stored images (a pretrained model's input
    #: pipeline, :func:`with_input_pipeline`): the stored images' size. ``image_size`` is then the
    #: model's input, reached by resizing to ``image_size / crop_pct`` and cropping the centre.
    stored_size: int | None = None
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        d = dict(d)
        for k in ("class_names", "mean", "std"):
            d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class ImageSplit:
    """Images (uint8, N x C x H x W) and integer labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    """The result of :func:`load`: metadata and the seed-fixed splits."""

    info: DataInfo
    train: ImageSplit
    test: ImageSplit
    #: Calibration images for PTQ: a seed-fixed subset of ``train`` (never of ``test``).
    calib: ImageSplit
    #: Validation split carved from the training set when ``val_size > 0`` (else empty).
    val: ImageSplit
    seed: int = 0
    params: dict = field(default_factory=dict)

    def split(self, name: str) -> ImageSplit:
        if name not in ("train", "test", "calib", "val"):
            raise ConfigError(f"unknown split {name!r}: use train, test, calib or val")
        return getattr(self, name)

    def summary(self) -> dict:
        return {**self.info.to_dict(), "train": len(self.train), "test": len(self.test),
                "calib": len(self.calib), "val": len(self.val), "seed": self.seed}


# ---------------------------------------------------------------------------------------
# Public entry points


def list_datasets() -> list[str]:
    """Registered dataset names (``imagefolder:PATH`` takes a path after the colon)."""
    return DATASETS.names() + ["imagefolder:PATH"]


def default_data_dir() -> Path:
    """``$WORKBENCH_DATA_DIR`` if set, else the repository's ``data/`` folder (in an installed
    wheel: the copy inside the package)."""
    env = os.environ.get("WORKBENCH_DATA_DIR")
    from .bundled import bundled_dir

    return Path(env) if env else bundled_dir("data")


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


def normalize(images: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """uint8 images -> the model's float input: scaled to [0, 1], resized and centre-cropped when
    ``info`` carries an input pipeline (:func:`with_input_pipeline`), then standardized with
    ``info``'s mean/std."""
    x = images.float().div_(255.0)
    if info.stored_size is not None:
        x = resize_center_crop(x, info.image_size, info.crop_pct, info.interpolation)
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (x - mean) / std


#: Interpolations of timm's ``pretrained_cfg`` that torch's ``interpolate`` has (PIL's names).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def resize_center_crop(x: torch.Tensor, size: int, crop_pct: float = 1.0,
                       interpolation: str = "bilinear") -> torch.Tensor:
    """timm's evaluation transform on a float batch in [0, 1]: resize the (square) images to
    ``floor(size / crop_pct)``, then keep the central ``size`` x ``size`` pixels."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    scale = int(math.floor(size / crop_pct))
    if x.shape[-1] != scale or x.shape[-2] != scale:
        smooth = interpolation != "nearest"
        x = F.interpolate(x, size=(scale, scale), mode=interpolation,
                          **({"align_corners": False, "antialias": True} if smooth else {}))
        x = x.clamp_(0.0, 1.0)  # bicubic overshoots; the pixel values it stands for do not
    top = (scale - size) // 2
    return x[..., top:top + size, top:top + size]


def with_input_pipeline(bundle: DataBundle, *, image_size: int, mean: tuple[float, ...] | None = None,
                        std: tuple[float, ...] | None = None, crop_pct: float = 1.0,
                        interpolation: str = "bilinear") -> DataBundle:
    """``bundle`` fed to a model that wants another input: ``image_size`` pixels (resize to
    ``image_size / crop_pct``, centre crop) standardized with ``mean``/``std`` (e.g. a pretrained
    timm model's ``pretrained_cfg``). The images stay stored at their own size; batches are
    transformed as they are made. A 3-value mean/std on 1-channel images is averaged: timm sums a
    pretrained RGB stem over its channels, so a grey image stands for R = G = B.

    Raises:
        ConfigError: a size below 1, a crop fraction outside (0, 1], an unknown interpolation,
            or a mean/std whose length fits neither the images' channels nor 3.
    """
    info = bundle.info
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a whole number of pixels >= 1, got {image_size!r}")
    if not 0.0 < float(crop_pct) <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")

    def per_channel(values: tuple[float, ...] | None, current: tuple[float, ...], what: str) -> tuple[float, ...]:
        if values is None:
            return current
        values = tuple(float(v) for v in values)
        if len(values) == info.channels:
            return values
        if info.channels == 1 and len(values) == 3:
            return (round(sum(values) / 3, 6),)
        raise ConfigError(f"{what} has {len(values)} values but {info.name} has {info.channels}-channel images")

    stored = info.stored_size if info.stored_size is not None else info.image_size
    new = replace(info, image_size=image_size, stored_size=stored, crop_pct=float(crop_pct),
                  interpolation=interpolation, mean=per_channel(mean, info.mean, "mean"),
                  std=per_channel(std, info.std, "std"))
    pipeline = {"image_size": image_size, "mean": list(new.mean), "std": list(new.std),
                "crop_pct": float(crop_pct), "interpolation": interpolation}
    return replace(bundle, info=new, params={**bundle.params, "input_pipeline": pipeline})


def match_recorded_pipeline(bundle: DataBundle, recorded_info: dict | None) -> DataBundle:
    """``bundle`` with the input pipeline a checkpoint was trained with (its ``data_info``), so
    that evaluation, PTQ and flatness see the images the model saw. Without one: unchanged."""
    if not recorded_info or recorded_info.get("stored_size") is None:
        return bundle
    return with_input_pipeline(bundle, image_size=int(recorded_info["image_size"]),
                               mean=tuple(recorded_info["mean"]), std=tuple(recorded_info["std"]),
                               crop_pct=float(recorded_info.get("crop_pct", 1.0)),
                               interpolation=recorded_info.get("interpolation", "bilinear"))


def augment_batch(images: torch.Tensor, info: DataInfo, generator: torch.Generator,
                  padding: int | None = None, *, total: int | None = None, offset: int = 0) -> torch.Tensor:
    """Random crop with zero padding, plus a horizontal flip where the labels allow it.

    Done on the whole uint8 batch with one gather instead of per-sample Python code.
    ``total``/``offset``: draw the random crops and flips of a batch of ``total`` images and apply
    those of positions ``offset .. offset + len(images)``: one process's shard of a global batch
    gets exactly the augmentation one process would give those images.
    """
    n, _, h, w = images.shape
    total = n if total is None else int(total)
    if not 0 <= offset <= total - n:
        raise ConfigError(f"a shard of {n} images at offset {offset} does not fit a batch of {total}")
    pad = max(1, h // 8) if padding is None else padding
    padded = F.pad(images, (pad, pad, pad, pad))
    shard = slice(offset, offset + n)
    oy = torch.randint(0, 2 * pad + 1, (total, 1, 1), generator=generator)[shard]
    ox = torch.randint(0, 2 * pad + 1, (total, 1, 1), generator=generator)[shard]
    rows = oy + torch.arange(h).view(1, h, 1)                       # (N, H, 1)
    cols = ox + torch.arange(w).view(1, 1, w)                       # (N, 1, W)
    if info.hflip:
        flip = torch.rand(total, 1, 1, generator=generator)[shard] < 0.5
        cols = torch.where(flip, ox + (w - 1 - torch.arange(w)).view(1, 1, w), cols)
    batch = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]             # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator fixing data order and augmentation of one epoch (resumable)."""
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


def num_batches(split: ImageSplit, batch_size: int, drop_last: bool = False) -> int:
    return len(split) // batch_size if drop_last else math.ceil(len(split) / batch_size)


def batches(split: ImageSplit, info: DataInfo, batch_size: int = 256, *, shuffle: bool = False,
            augment: bool = False, device: str | torch.device = "cpu", seed: int = 0, epoch: int = 0,
            drop_last: bool = False, start_batch: int = 0, limit: int | None = None,
            rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized float ``(images, labels)`` batches on ``device``.

    Order and augmentation depend only on ``(seed, epoch)``, so a resumed run can skip the
    first ``start_batch`` batches and see exactly what the interrupted run would have seen.
    ``limit`` caps the number of images (e.g. ``n_calib``).

    With ``world_size`` > 1 each batch of ``batch_size`` images (the global batch) is cut into
    ``world_size`` contiguous shards and rank ``rank`` gets its own (``batch_size / world_size``
    images when it divides), augmented as the whole batch would be: the processes together see
    exactly the batches of a single process. Empty shards (a last batch smaller than
    ``world_size``) are skipped.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    shard_bounds(0, rank, world_size)  # checks rank and world_size
    n = len(split) if limit is None else min(len(split), int(limit))
    if n == 0:
        raise DataError("the split is empty: nothing to iterate over")
    gen = epoch_generator(seed, epoch)
    order = torch.randperm(len(split), generator=gen)[:n] if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i, start in enumerate(range(0, stop, batch_size)):
        idx = order[start:start + batch_size]
        lo, hi = shard_bounds(len(idx), rank, world_size)
        full, idx = len(idx), idx[lo:hi]
        imgs = split.images[idx]
        if augment:  # draws the random numbers of the whole batch (resumable, shard-independent)
            imgs = augment_batch(imgs, info, gen, total=full, offset=lo)
        if i < start_batch or len(idx) == 0:
            continue
        x = normalize(imgs.to(device, non_blocking=True), info)
        yield x, split.labels[idx].to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path.name}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path.name} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path.name} is truncated: expected {int(np.prod(shape))} bytes, found {body.size}")
    return body.reshape(shape).copy()


def _fashion_candidates(data_dir: Path | None) -> list[Path]:
    cands = []
    if data_dir is not None:
        cands += [data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw"]
    return cands + [SYSTEM_FASHION_MNIST_DIR]


def find_fashion_mnist_dir(data_dir: Path | None = None) -> Path:
    """The first folder holding the four Fashion-MNIST IDX ``.gz`` files."""
    cands = _fashion_candidates(data_dir)
    for c in cands:
        if all((c / f).is_file() for f in FASHION_MNIST_FILES):
            return c
    raise DataError(
        "dataset 'fashion-mnist' not found: the four IDX files "
        f"({', '.join(FASHION_MNIST_FILES)}) are in none of: {', '.join(str(c) for c in cands)}.\n"
        "Get them with one of:\n"
        "  * on Debian/Ubuntu: apt-get install dataset-fashion-mnist\n"
        "  * workbench data download fashion-mnist   (torchvision download into the data directory)\n"
        "  * copy the .gz files from the Fashion-MNIST release into <data_dir>/fashion-mnist/\n"
        "Or use the embedded subset: --data fashion-mnist-mini"
    )


def _fashion_info(name: str, source: str) -> DataInfo:
    return DataInfo(name=name, image_size=28, channels=1, num_classes=10, class_names=FASHION_CLASSES,
                    mean=FASHION_MEAN, std=FASHION_STD, hflip=True, source=source,
                    licence="MIT (Zalando Research, Fashion-MNIST)")


def _split_from_numpy(images: np.ndarray, labels: np.ndarray) -> ImageSplit:
    imgs = torch.from_numpy(np.ascontiguousarray(images))
    if imgs.dim() == 3:
        imgs = imgs.unsqueeze(1)
    return ImageSplit(imgs, torch.from_numpy(labels.astype(np.int64)))


_verified: dict[tuple[str, int, float], bool] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, expected: str) -> None:
    """Raise DataError unless ``path`` has the expected SHA-256 (cached per file state)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime)
    if _verified.get(key):
        return
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {path.name}: expected sha256 {expected[:16]}..., got {actual[:16]}...; "
            "the file is corrupt or was modified. Restore it with `git checkout -- data/{0}` "
            "or rebuild it with `python data/make_fashion_mnist_mini.py`.".format(path.name)
        )
    _verified[key] = True


@DATASETS.register("fashion-mnist-mini", help="10k/2k class-balanced real Fashion-MNIST subset (embedded)")
def _load_fashion_mini(data_dir: Path, download: bool = False):
    path = data_dir / MINI_FILE
    if not path.is_file():
        fallback = default_data_dir() / MINI_FILE
        if fallback.is_file() and data_dir != default_data_dir():
            path = fallback
        else:
            raise DataError(
                f"dataset 'fashion-mnist-mini' not found: {MINI_FILE} is missing from {data_dir}. "
                "It is committed in the repository under data/; restore it with "
                f"`git checkout -- data/{MINI_FILE}`, or rebuild it from the full set with "
                "`python data/make_fashion_mnist_mini.py`."
            )
    verify_checksum(path, MINI_SHA256)
    with np.load(path, allow_pickle=False) as z:
        train = _split_from_numpy(z["train_images"], z["train_labels"])
        test = _split_from_numpy(z["test_images"], z["test_labels"])
    return _fashion_info("fashion-mnist-mini", "Fashion-MNIST subset, 1000/200 per class"), train, test


@DATASETS.register("fashion-mnist", help="full Fashion-MNIST, 60k/10k (IDX files or torchvision download)")
def _load_fashion_full(data_dir: Path, download: bool = False):
    try:
        src = find_fashion_mnist_dir(data_dir)
    except DataError:
        if not download:
            raise
        _torchvision_download("fashion-mnist", data_dir)
        src = find_fashion_mnist_dir(data_dir)
    train = _split_from_numpy(read_idx(src / FASHION_MNIST_FILES[0]), read_idx(src / FASHION_MNIST_FILES[1]))
    test = _split_from_numpy(read_idx(src / FASHION_MNIST_FILES[2]), read_idx(src / FASHION_MNIST_FILES[3]))
    return _fashion_info("fashion-mnist", "Fashion-MNIST IDX files"), train, test


# ---------------------------------------------------------------------------------------
# scikit-learn digits


@DATASETS.register("digits", help="scikit-learn 8x8 digits, 1,797 images (80/20 stratified split)")
def _load_digits(data_dir: Path, download: bool = False):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)      # 0..16 -> 0..255
    idx_tr, idx_te = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0,
                                      stratify=d.target)
    train = _split_from_numpy(images[np.sort(idx_tr)], d.target[np.sort(idx_tr)])
    test = _split_from_numpy(images[np.sort(idx_te)], d.target[np.sort(idx_te)])
    mean, std = _stats(train.images)
    info = DataInfo(name="digits", image_size=8, channels=1, num_classes=10,
                    class_names=tuple(str(i) for i in range(10)), mean=mean, std=std, hflip=False,
                    source="scikit-learn load_digits (UCI optical digits)", licence="CC BY 4.0 (UCI)")
    return info, train, test


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# ---------------------------------------------------------------------------------------
# CIFAR (torchvision)

_CIFAR = {
    "cifar10": ("CIFAR10", ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": ("CIFAR100", ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
}


def _torchvision_download(name: str, data_dir: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        cls(root=str(data_dir), train=True, download=True)
        cls(root=str(data_dir), train=False, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError, ...
        raise DataError(
            f"could not download dataset {name!r} into {data_dir}: {type(e).__name__}: {e}\n"
            "This machine may be offline. Download it on a machine with internet access "
            f"(`workbench data download {name} --data-dir DIR`) and copy DIR here, "
            "then pass --data-dir DIR."
        ) from e


def _load_cifar(name: str, data_dir: Path, download: bool):
    import torchvision.datasets as tvd

    cls_name, (mean, std) = _CIFAR[name]
    cls = getattr(tvd, cls_name)
    try:
        tr = cls(root=str(data_dir), train=True, download=False)
        te = cls(root=str(data_dir), train=False, download=False)
    except RuntimeError:
        if not download:
            raise DataError(
                f"dataset {name!r} not found in {data_dir}. It needs a download: run "
                f"`workbench data download {name}` (or pass download=True / --download) on a machine "
                "with internet access, or copy torchvision's extracted "
                f"'{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}' folder into "
                f"{data_dir}."
            ) from None
        _torchvision_download(name, data_dir)
        tr = cls(root=str(data_dir), train=True, download=False)
        te = cls(root=str(data_dir), train=False, download=False)
    train = _split_from_numpy(np.asarray(tr.data).transpose(0, 3, 1, 2), np.asarray(tr.targets))
    test = _split_from_numpy(np.asarray(te.data).transpose(0, 3, 1, 2), np.asarray(te.targets))
    info = DataInfo(name=name, image_size=32, channels=3, num_classes=len(tr.classes),
                    class_names=tuple(tr.classes), mean=mean, std=std, hflip=True,
                    source=f"torchvision {cls_name}", licence="see the CIFAR terms (Krizhevsky, 2009)")
    return info, train, test


DATASETS.register("cifar10", lambda data_dir, download=False: _load_cifar("cifar10", data_dir, download),
                  help="CIFAR-10 via torchvision (needs a download)")
DATASETS.register("cifar100", lambda data_dir, download=False: _load_cifar("cifar100", data_dir, download),
                  help="CIFAR-100 via torchvision (needs a download)")


# ---------------------------------------------------------------------------------------
# Any folder of class sub-folders


def load_imagefolder(root: Path, *, image_size: int | None = None, seed: int = 0,
                     test_fraction: float = 0.2):
    """Load ``root/<class>/<image>`` (or ``root/train/...`` + ``root/test|val/...``) into memory.

    Images are converted to grayscale if every image is grayscale, else RGB, and resized to
    ``image_size`` x ``image_size`` (default: the first image's height).
    """
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a directory; pass imagefolder:PATH with PATH a "
                        "folder holding one sub-folder per class")
    split_dirs = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}

    def read(folder: Path) -> tuple[ImageFolder, list[Image.Image]]:
        try:
            ds = ImageFolder(str(folder), loader=lambda p: Image.open(p).copy())
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"imagefolder: no images found under {folder}: {e}") from e
        return ds, [ds[i][0] for i in range(len(ds))]

    if "train" in split_dirs and ("test" in split_dirs or "val" in split_dirs):
        tr_ds, tr_imgs = read(split_dirs["train"])
        te_ds, te_imgs = read(split_dirs.get("test", split_dirs.get("val")))
        if te_ds.classes != tr_ds.classes:
            raise DataError(f"imagefolder: train classes {tr_ds.classes} differ from test classes {te_ds.classes}")
        tr_labels, te_labels = np.array(tr_ds.targets), np.array(te_ds.targets)
    else:
        tr_ds, all_imgs = read(root)
        labels = np.array(tr_ds.targets)
        perm = np.random.default_rng(seed).permutation(len(all_imgs))
        n_test = max(1, int(round(test_fraction * len(all_imgs))))
        te_idx, tr_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        tr_imgs, te_imgs = [all_imgs[i] for i in tr_idx], [all_imgs[i] for i in te_idx]
        tr_labels, te_labels = labels[tr_idx], labels[te_idx]
    gray = all(im.mode in ("L", "1", "I;16", "I") for im in tr_imgs + te_imgs)
    mode = "L" if gray else "RGB"
    size = image_size or tr_imgs[0].size[1]

    def to_array(imgs: list[Image.Image]) -> np.ndarray:
        arr = [np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8) for im in imgs]
        a = np.stack(arr)
        return a[:, None] if gray else a.transpose(0, 3, 1, 2)

    train = _split_from_numpy(to_array(tr_imgs), tr_labels)
    test = _split_from_numpy(to_array(te_imgs), te_labels)
    mean, std = _stats(train.images)
    info = DataInfo(name=f"imagefolder:{root.name}", image_size=size, channels=1 if gray else 3,
                    num_classes=len(tr_ds.classes), class_names=tuple(tr_ds.classes), mean=mean, std=std,
                    hflip=True, source="image folder", licence="")
    return info, train, test
