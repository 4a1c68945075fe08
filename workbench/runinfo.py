"""Run bookkeeping: seeds, versions, git commit, output folders and atomic writes."""

from __future__ import annotations

import csv
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import RunDirError
from .files import atomic_write, atomic_write_bytes, atomic_write_text  # noqa: F401 - re-exported

if TYPE_CHECKING:  # torch and numpy load inside the functions that need them: the CLI's parser
    import torch  # imports this module, and `workbench --help` should not pay for torch


def _loaded(name: str) -> Any:
    """The module if something already imported it, else None (then none of its objects exist)."""
    return sys.modules.get(name)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): same seed, same init and noise."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def progress_bar(total: int, desc: str, enabled: bool = True, *, initial: int = 0, unit: str = "it",
                 leave: bool = False) -> Any:
    """The one progress bar (``tqdm.auto``: a widget in JupyterLab, text in a terminal); a
    disabled one accepts ``update``/``close`` and prints nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=not enabled, leave=leave,
                dynamic_ncols=True)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model lives on: that of its first parameter (or buffer); CPU for a model
    with neither. The one such helper (PTQ, flatness, training and the notebooks use it)."""
    import torch

    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` a device name means, checked against this machine.

    ``'auto'``/None -> CUDA when available, else CPU. Accepted names: ``auto``, ``cpu``,
    ``cuda``, ``cuda:N`` and ``mps`` (Apple GPUs, where torch supports them).

    Raises:
        ConfigError: an unknown device name, or a device this machine does not have (CUDA
            without a visible GPU, ``cuda:N`` past the last GPU, ``mps`` without support);
            the message lists what this machine offers.
    """
    import torch

    from .errors import ConfigError

    if device is None or str(device).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ["auto", "cpu"]
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu:
        have += ["cuda"] + [f"cuda:{i}" for i in range(n_gpu)]
    if _mps_available():
        have.append("mps")
    offer = f"this machine offers: {', '.join(have)}"
    text = str(device).strip().lower()
    try:
        dev = device if isinstance(device, torch.device) else torch.device(text)
    except (RuntimeError, ValueError):  # torch says "Expected one of cpu, cuda, ... device type at start of"
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {str(device)!r}: use auto, cpu, cuda, cuda:N or mps ({offer})")
    if dev.type == "cuda":
        if not n_gpu:
            raise ConfigError(f"device {str(device)!r} was asked for but no CUDA GPU is visible; "
                              f"use --device cpu or auto ({offer})")
        if dev.index is not None and dev.index >= n_gpu:
            raise ConfigError(f"device {str(device)!r} does not exist: {n_gpu} CUDA GPU(s) are visible, "
                              f"cuda:0 to cuda:{n_gpu - 1} ({offer})")
    if dev.type == "mps" and not _mps_available():
        raise ConfigError(f"device 'mps' was asked for but this torch build or machine has no MPS support; "
                          f"use --device cpu or auto ({offer})")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ConfigError(f"device {str(device)!r}: the CPU takes no index; use cpu ({offer})")
    return dev


def git_commit(repo: Path | None = None) -> dict[str, Any]:
    """The commit of the workbench checkout (``None`` outside a git checkout, e.g. an installed
    wheel: whatever repository the environment sits in is not the workbench's) and a dirty flag."""
    from .bundled import repo_root

    repo = repo or repo_root()
    if repo is None:
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty if commit else None}


def versions() -> dict[str, str]:
    """Versions of Python, the workbench and its main libraries."""
    import numpy as np
    import torch

    from . import __version__

    out = {"python": platform.python_version(), "workbench": __version__, "torch": torch.__version__,
           "numpy": str(np.__version__), "platform": platform.platform()}
    out["torch"] = str(torch.__version__)  # TorchVersion is not a plain str: keep checkpoints safe-loadable
    for mod in ("timm", "torchvision"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except ImportError:  # pragma: no cover - both are dependencies
            out[mod] = "missing"
    out["cuda"] = torch.version.cuda or "none"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run_metadata(params: dict[str, Any]) -> dict[str, Any]:
    """What every run records: its parameters, versions, git commit, time and command line."""
    return {"params": params, "versions": versions(), "git": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv)}


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Tidy rows -> CSV (columns: union of keys in first-seen order)."""
    import io

    rows = list(rows)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: json_default(v) if _is_array_scalar(v) else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _is_array_scalar(v: Any) -> bool:
    torch, np = _loaded("torch"), _loaded("numpy")
    return bool((torch is not None and isinstance(v, torch.Tensor)) or (np is not None and isinstance(v, np.generic)))


def json_default(o: Any) -> Any:
    torch, np = _loaded("torch"), _loaded("numpy")
    if torch is not None and isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if np is not None and isinstance(o, np.generic):
        return o.item()
    if np is not None and isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def prepare_run_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Create an output folder, refusing to silently reuse one that already holds results.

    Raises:
        RunDirError: the folder exists and is not empty, and neither ``resume`` nor
            ``overwrite`` was asked for; or ``resume`` was asked for a folder without a run.
    """
    path = Path(path)
    if resume:
        if not (path / "last.pt").is_file():
            raise RunDirError(f"cannot resume: {path} holds no interrupted run (no last.pt)")
        return path
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RunDirError(
            f"output folder {path} already exists and is not empty; choose a new --out, pass "
            "--resume to continue an interrupted run there, or --overwrite to replace its results"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path
