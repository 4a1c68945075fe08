"""The reference model zoo: trained checkpoints to pre-condition, each with the command that made it.

The subject of the workbench is a *trained* network made flat for a target precision, then
quantized (the DNQ paper's pipeline: trained model, short noise fine-tune, PTQ). Models trained
from scratch on toy budgets sit far from a minimum, where the second-order argument does not
hold. The zoo gives every study and notebook converged parents to start from.

Layout (``data/zoo/``, or ``$WORKBENCH_ZOO_DIR``):

* ``NAME.pt``: a workbench checkpoint (read with ``weights_only=True``);
* ``zoo.json``: per entry the exact ``workbench train`` command that made it, its metrics,
  sha256, size and training time. The sha256 is checked on every load.

``workbench zoo build NAME`` re-makes an entry with its recorded command and publishes it;
``workbench train --init zoo:NAME`` fine-tunes from it (a new run with its own optimizer and
schedule, recording the parent and its sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, RunDirError
from .files import atomic_write
from .registry import Registry
from .runinfo import atomic_write_text

log = logging.getLogger(__name__)

#: Overrides where the zoo lives (a folder with zoo.json and NAME.pt files).
ZOO_DIR_ENV = "WORKBENCH_ZOO_DIR"
MANIFEST = "zoo.json"
#: The prefix that names a zoo entry where a checkpoint path is expected (``--init zoo:NAME``).
PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooRecipe:
    """How an entry is made: the ``workbench train`` arguments (everything but ``--out``)."""

    name: str
    description: str
    train_args: tuple[str, ...]

    def command(self) -> str:
        return "workbench train " + " ".join(self.train_args) + f" --out DIR/{self.name}"


ZOO: Registry[ZooRecipe] = Registry("zoo model")


def _recipe(name: str, description: str, *args: str) -> None:
    ZOO.register(name, ZooRecipe(name, description, tuple(args)), help=description)


# vit-micro's and cnn-small's default recipes (workbench.models.RECIPES, TrainConfig), whole training sets
_recipe("vit-micro-fmnist", "vit-micro on the full Fashion-MNIST, 20 epochs (about 90.7 %)",
        "--data", "fashion-mnist", "--model", "vit-micro", "--epochs", "20", "--seed", "0", "--no-progress")
for _seed in (0, 1, 2):
    _recipe(f"vit-micro-mini-s{_seed}", f"vit-micro on fashion-mnist-mini, default 14-epoch recipe, seed {_seed}",
            "--data", "fashion-mnist-mini", "--model", "vit-micro", "--seed", str(_seed), "--no-progress")
_recipe("cnn-small-mini", "cnn-small on fashion-mnist-mini, default 6-epoch recipe, seed 0",
        "--data", "fashion-mnist-mini", "--model", "cnn-small", "--seed", "0", "--no-progress")


def zoo_dir() -> Path:
    """``$WORKBENCH_ZOO_DIR`` if set, else ``data/zoo`` in the repository (in an installed wheel:
    the copy inside the package)."""
    from .bundled import bundled_dir

    env = os.environ.get(ZOO_DIR_ENV)
    return Path(env) if env else bundled_dir("data") / "zoo"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: str | Path | None = None) -> dict[str, Any]:
    """The published entries (``zoo.json``); empty when nothing was published there."""
    path = Path(folder or zoo_dir()) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the repository") from e


def list_entries(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per recipe: name, description, whether it is published here, and its metrics."""
    pub = manifest(folder)
    rows = []
    for name in ZOO.names():
        m = pub.get(name, {})
        rows.append({"name": name, "description": ZOO.get(name).description, "available": bool(m),
                     "test_accuracy": m.get("metrics", {}).get("test_accuracy"),
                     "data": m.get("data"), "model": m.get("model"), "size_mb": m.get("size_mb")})
    return rows


def info(name: str, folder: str | Path | None = None) -> dict[str, Any]:
    """Everything known about one entry: its recipe (command) and, when published, its record."""
    recipe = ZOO.get(name)
    return {"name": name, "description": recipe.description, "command": recipe.command(),
            **manifest(folder).get(name, {"available": False})}


def path(name: str, folder: str | Path | None = None) -> Path:
    """The verified checkpoint file of a published entry.

    Raises:
        UnknownNameError: no such recipe (lists the valid names).
        CheckpointError: not published here, or its sha256 differs from the recorded one.
    """
    recipe = ZOO.get(name)
    folder = Path(folder or zoo_dir())
    record = manifest(folder).get(name)
    file = folder / f"{name}.pt"
    if record is None or not file.is_file():
        raise CheckpointError(f"zoo entry {name!r} is not in {folder}: make it with `workbench zoo build {name}` "
                              f"(runs: {recipe.command()})")
    digest = sha256_file(file)
    if digest != record["sha256"]:
        raise CheckpointError(f"zoo entry {name!r}: {file} has sha256 {digest[:16]}..., but {MANIFEST} records "
                              f"{record['sha256'][:16]}...; the file is damaged or was replaced. Restore it "
                              f"(git checkout -- {file.name}) or rebuild it with `workbench zoo build {name} "
                              "--overwrite`")
    return file


def load(name: str, device: str | Any = "cpu", folder: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """``(model, checkpoint)`` of a published entry, checksum verified."""
    from .checkpoint import load_model

    return load_model(path(name, folder), device)


#: The prefix of a pretrained timm model as a starting point (``init="timm:vit_tiny_patch16_224"``).
TIMM_PREFIX = "timm:"


def init_file(source: str | Path) -> Path:
    """The checkpoint file of a starting point: ``zoo:NAME`` (sha256-verified) or a path.

    Raises:
        CheckpointError: no such file (or a zoo checksum mismatch).
    """
    text = str(source)
    file = path(text[len(PREFIX):]) if text.startswith(PREFIX) else Path(text).expanduser().resolve()
    if not file.is_file():
        raise CheckpointError(f"--init {text}: no such checkpoint; give a model.pt path or zoo:NAME "
                              f"(`workbench zoo list`)")
    return file


def init_data_info(source: str | Path) -> dict[str, Any] | None:
    """The ``data_info`` a checkpoint starting point was trained with (its dataset and input
    pipeline); ``None`` for a pretrained ``timm:NAME``, whose pipeline is timm's."""
    from .checkpoint import load_checkpoint

    if str(source).startswith(TIMM_PREFIX):
        return None
    return load_checkpoint(init_file(source)).get("data_info")


def load_init(source: str | Path, device: str | Any = "cpu", info: Any = None,
              pretrained: bool = True) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The starting point of a fine-tune: ``zoo:NAME``, a checkpoint path, or ``timm:NAME``
    (timm's pretrained weights, with a new head for ``info``'s classes: give ``info``, a
    :class:`workbench.data.DataInfo` already carrying the model's input pipeline).
    ``pretrained=False`` gives a ``timm:NAME`` architecture its random initialization instead: a
    dry run that needs no internet (the numbers then say nothing about the trained model).

    Returns:
        ``(model, checkpoint, record)``; ``record`` (source, file, sha256, the parent's model,
        data, method and metrics) goes into the fine-tune's ``run.json`` and checkpoints. For
        ``timm:NAME`` the checkpoint is a stand-in holding the model spec and data info.
    """
    from .checkpoint import load_model

    text = str(source)
    if text.startswith(TIMM_PREFIX):
        from .models import create

        if info is None:
            raise ConfigError(f"init={text!r} needs the dataset (info) to size the new classifier head")
        model = create(text, info, pretrained=bool(pretrained)).to(device)
        ckpt = {"model_spec": model.workbench_spec, "data_info": info.to_dict(), "metrics": {}}
        record = {"source": text, "file": None, "sha256": None, "model": text, "data": info.name,
                  "method": "pretrained" if pretrained else "random init (dry run)", "metrics": {}}
        return model, ckpt, record
    file = init_file(text)
    model, ckpt = load_model(file, device)
    record = {"source": text, "file": str(file), "sha256": sha256_file(file),
              "model": ckpt["model_spec"].get("name"), "data": ckpt.get("data_info", {}).get("name"),
              "method": ckpt.get("method_config", {}).get("method", "plain"),
              "metrics": {k: v for k, v in ckpt.get("metrics", {}).items()
                          if k in ("test_accuracy", "test_loss", "val_accuracy", "epochs")}}
    return model, ckpt, record


def publish(name: str, run_dir: str | Path, *, folder: str | Path | None = None, overwrite: bool = False,
            command: str | None = None) -> dict[str, Any]:
    """Copy a finished run's ``model.pt`` into the zoo as ``NAME.pt`` and record it in ``zoo.json``.

    Raises:
        RunDirError: the entry exists and ``overwrite`` is false, or the run has no model.pt.
    """
    from .checkpoint import load_checkpoint

    recipe = ZOO.get(name)
    folder = Path(folder or zoo_dir())
    run_dir = Path(run_dir)
    src = run_dir / "model.pt"
    if not src.is_file():
        raise RunDirError(f"{run_dir} holds no model.pt: the training run did not finish")
    pub = manifest(folder)
    if name in pub and not overwrite:
        raise RunDirError(f"zoo entry {name!r} exists in {folder}; pass overwrite (--overwrite) to replace it")
    ckpt = load_checkpoint(src)
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    atomic_write(folder / f"{name}.pt", lambda tmp: shutil.copyfile(src, tmp))
    metrics = ckpt.get("metrics", {})
    record = {
        "description": recipe.description, "command": command or recipe.command(),
        "model": ckpt["model_spec"].get("name"), "data": ckpt.get("data_info", {}).get("name"),
        "metrics": {k: metrics[k] for k in ("test_accuracy", "test_loss", "epochs", "total_train_time")
                    if k in metrics},
        "sha256": sha256_file(folder / f"{name}.pt"), "size_mb": round((folder / f"{name}.pt").stat().st_size / 2**20, 2),
        "versions": run.get("versions", {}), "git": run.get("git", {}), "available": True,
    }
    pub[name] = record
    atomic_write_text(folder / MANIFEST, json.dumps(dict(sorted(pub.items())), indent=2) + "\n")
    log.info("zoo: published %s (%.2f %%)", name, record["metrics"].get("test_accuracy", float("nan")))
    return record
