"""Checkpoints: weights plus everything needed to rebuild and judge the model.

Saved with ``torch.save`` as a dict of tensors and plain values, loaded with
``torch.load(..., weights_only=True)``: loading never unpickles arbitrary objects.
Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .runinfo import atomic_write_bytes, git_commit, versions

FORMAT = "flatquant-workbench-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, model: nn.Module, *, data_info: dict | None = None,
                    train_config: dict | None = None, method_config: dict | None = None,
                    metrics: dict | None = None, progress: dict | None = None,
                    optimizer: dict | None = None, scheduler: dict | None = None,
                    method_state: dict | None = None, extra: dict | None = None) -> Path:
    """Atomically write a workbench checkpoint for a model made by :func:`workbench.models.create`."""
    spec = getattr(model, "workbench_spec", None)
    if spec is None:
        raise CheckpointError("the model has no workbench_spec: build it with workbench.models.create "
                              "so the checkpoint can rebuild it")
    ckpt = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_spec": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data_info": data_info or {}, "train_config": train_config or {},
        "method_config": method_config or {"method": "plain"}, "metrics": metrics or {},
        "progress": progress or {}, "versions": versions(), "git": git_commit(), "extra": extra or {},
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    if scheduler is not None:
        ckpt["scheduler"] = scheduler
    if method_state is not None:
        ckpt["method_state"] = method_state
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a workbench checkpoint safely (``weights_only=True``).

    Raises:
        CheckpointError: missing file, not a torch file, or not a workbench checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler raises many types (KeyError, UnpicklingError, ...) on junk
        raise CheckpointError(
            f"{path} is not a workbench checkpoint (it could not be read as a safe torch file: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a workbench checkpoint (no '{FORMAT}' marker); "
                              "make checkpoints with `workbench train` or workbench.checkpoint.save_checkpoint")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer workbench (format {ckpt['format_version']})")
    return ckpt


def check_compatible(ckpt: dict[str, Any], model: nn.Module, source: str = "checkpoint") -> None:
    """Refuse a checkpoint made for another architecture or class count, with a clear message."""
    spec = ckpt.get("model_spec", {})
    mspec = getattr(model, "workbench_spec", {})
    if mspec and spec.get("name") != mspec.get("name"):
        raise CheckpointError(f"{source} is for model {spec.get('name')!r}, not {mspec.get('name')!r}")
    if mspec and spec.get("num_classes") != mspec.get("num_classes"):
        raise CheckpointError(f"{source} has {spec.get('num_classes')} classes but the model has "
                              f"{mspec.get('num_classes')}; use a checkpoint trained on the same dataset")
    own = model.state_dict()
    sd = ckpt["state_dict"]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if bad:
            parts.append(f"shape mismatches {bad[:5]}")
        raise CheckpointError(f"{source} does not fit this architecture: " + "; ".join(parts))


def recorded_data_params(path: str | Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The :func:`workbench.data.load` arguments the run that wrote ``ckpt`` used.

    ``workbench train`` (:func:`workbench.train.fit`) records them in ``run.json`` beside its
    checkpoints (``params.data``: name, seed, n_calib, val_size). Reloading with them gives the
    run's own splits: ``val`` is the held-out set and ``train`` excludes it. Without a matching
    ``run.json`` (a checkpoint copied elsewhere, or written by :func:`save_checkpoint` directly)
    this falls back to the checkpoint's dataset name and training seed, with no ``val`` split.

    Returns:
        A dict with ``name`` (None when unknown), ``seed``, ``val_size`` and, when recorded,
        ``n_calib``; and ``source``: the file the values came from.
    """
    path = Path(path)
    name = ckpt.get("data_info", {}).get("name")
    out: dict[str, Any] = {"name": name, "seed": ckpt.get("train_config", {}).get("seed", 0), "val_size": 0,
                           "source": str(path)}
    run_json = path.parent / "run.json"
    try:
        recorded = json.loads(run_json.read_text())["params"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return out
    # a run.json of another run (e.g. the checkpoint was copied into a foreign folder) is ignored
    if not isinstance(recorded, dict) or recorded.get("name") != name:
        return out
    out.update({k: recorded[k] for k in ("seed", "n_calib", "val_size") if k in recorded}, source=str(run_json))
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as, load its weights, return ``(model, ckpt)``.

    The model is returned in eval mode. A QAT checkpoint comes back with its learned quantizers
    attached (see :mod:`workbench.lsq`): the quantized model it was trained and evaluated as.
    """
    from .models import create

    ckpt = load_checkpoint(path)
    spec = ckpt["model_spec"]
    model = create(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                   img_size=spec["img_size"], **spec.get("overrides", {}))
    method = ckpt.get("method_config") or {}
    if method.get("method") == "qat":  # the learned quantizers are part of the trained model
        from . import lsq

        lsq.attach(model, method.get("w_bits"), method.get("a_bits"), method.get("include", ("*",)),
                   method.get("exclude", ()))
    check_compatible(ckpt, model, source=str(path))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
