"""The registered datasets and where their files come from: Fashion-MNIST (the embedded mini
subset and the full IDX files), scikit-learn's digits, CIFAR (torchvision) and any image folder."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..registry import Registry
from .splits import DataInfo, ImageSplit

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


def default_data_dir() -> Path:
    """``$WORKBENCH_DATA_DIR`` if set, else the repository's ``data/`` folder (in an installed
    wheel: the copy inside the package)."""
    env = os.environ.get("WORKBENCH_DATA_DIR")
    from ..bundled import bundled_dir

    return Path(env) if env else bundled_dir("data")


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
