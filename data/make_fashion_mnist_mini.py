"""Build data/fashion-mnist-mini.npz, the workbench's embedded default dataset.

A class-balanced, seed-fixed real subset of Fashion-MNIST: 1,000 training and 200 test
images per class (10,000 / 2,000), uint8 28x28, stored compressed.

Source: the official Fashion-MNIST IDX files (Zalando Research, MIT licence), e.g. from
the Debian package ``dataset-fashion-mnist`` or torchvision's download. Usage::

    python data/make_fashion_mnist_mini.py [SOURCE_DIR]

The SHA-256 of the result is printed; it must match ``MINI_SHA256`` in workbench/data.py.
The archive is written with fixed timestamps so the same source gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.data import find_fashion_mnist_dir, read_idx  # noqa: E402

PER_CLASS_TRAIN = 1000
PER_CLASS_TEST = 200
SEED = 20251103


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(idx))


def write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed but with fixed zip timestamps (reproducible bytes)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2025, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def main() -> None:
    src = find_fashion_mnist_dir(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    rng = np.random.default_rng(SEED)
    x_tr = read_idx(src / "train-images-idx3-ubyte.gz")
    y_tr = read_idx(src / "train-labels-idx1-ubyte.gz")
    x_te = read_idx(src / "t10k-images-idx3-ubyte.gz")
    y_te = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    i_tr = balanced_subset(y_tr, PER_CLASS_TRAIN, rng)
    i_te = balanced_subset(y_te, PER_CLASS_TEST, rng)
    out = Path(__file__).resolve().parent / "fashion-mnist-mini.npz"
    write_npz_deterministic(out, {
        "train_images": x_tr[i_tr], "train_labels": y_tr[i_tr].astype(np.uint8),
        "test_images": x_te[i_te], "test_labels": y_te[i_te].astype(np.uint8),
        "train_source_index": i_tr.astype(np.int32), "test_source_index": i_te.astype(np.int32),
    })
    print(f"wrote {out.name}: {out.stat().st_size / 1e6:.2f} MB")
    print("sha256", hashlib.sha256(out.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
