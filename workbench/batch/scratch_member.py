"""One member of the from-scratch study, as the member notebook (``notebooks/06_study_member.ipynb``)
runs it: train one model with one method and seed, quantize it at every bit setting, measure its
flatness, and write its row."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runinfo import model_device

if TYPE_CHECKING:  # torch and the data module load inside the functions
    from torch import nn

    from .. import data as wdata

#: The notebook every study member executes.
MEMBER_NOTEBOOK = "06_study_member"
#: The PTQ settings of the study (W2A4 shows whether anything survives 2-bit weights).
DEFAULT_BITS = ("W8A8", "W6A6", "W4A8", "W4A4", "W3A3", "W2A4")

def train_member(bundle: wdata.DataBundle, *, model: str, method: str, label: str | None = None,
                 model_args: Mapping[str, Any] | None = None, w_bits: int | None = 4, a_bits: int | None = 4,
                 noise_mult: float = 1.0, method_args: Mapping[str, Any] | None = None, epochs: int | None = None,
                 train_args: Mapping[str, Any] | None = None, batch_size: int | None = None, seed: int = 0,
                 device: str = "cpu", out_dir: str | Path | None = None, progress: bool = True) -> Any:
    """Train one member with the model's recipe (:data:`workbench.models.RECIPES`), ``epochs``,
    ``batch_size`` and ``train_args`` on top. Returns a :class:`workbench.nbtools.Trained`."""
    from ..models import default_recipe
    from ..nbtools import train_methods

    entry = {"method": method, "label": label or method, "w_bits": w_bits, "a_bits": a_bits,
             "noise_mult": noise_mult, **dict(method_args or {})}
    recipe = {**default_recipe(model), **dict(train_args or {})}
    n_epochs = int(epochs or recipe.get("epochs", 14))
    bs = int(batch_size or recipe.get("batch_size", 128))
    rest = {k: v for k, v in recipe.items() if k not in ("epochs", "batch_size")}
    trained = train_methods([entry], bundle, model=model, model_args=dict(model_args or {}), epochs=n_epochs,
                            seed=seed, device=device, batch_size=bs, out_dir=out_dir, progress=progress,
                            train_args=rest)
    return trained[entry["label"]]


def has_attention(model: nn.Module) -> bool:
    """Whether the model has attention blocks whose matmul inputs PTQ can quantize."""
    return any(hasattr(m, "qkv") for m in model.modules())


def member_ptq(label: str, model: nn.Module, method: str, bundle: wdata.DataBundle, configs: Sequence[Any], *,
               split: str = "test", n_calib: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """:func:`workbench.ptq.sweep` of one model on ``split`` with ``drop`` (FP minus quantized
    accuracy, points) and ``loss_increase`` on every row. Configs that quantize attention matmuls
    are skipped for models without attention (they would repeat the same numbers)."""
    from .. import data as wdata
    from ..ptq import against_fp, sweep

    dev = model_device(model)
    if not has_attention(model):
        seen, kept = set(), []
        for c in configs:
            key = (c.w_bits, c.a_bits, c.observer)
            if key not in seen:
                seen.add(key)
                kept.append(c)
        configs = kept
    calib = list(wdata.batches(bundle.calib, bundle.info, 128, limit=n_calib, device=dev))
    evals = list(wdata.batches(bundle.split(split), bundle.info, 500, device=dev))
    rows = against_fp(sweep([(label, model, method)], configs, calib, evals, progress=progress))
    for r in rows:
        r["label"] = r.pop("checkpoint")
        r["split"] = split
    return rows


def member_flatness(label: str, model: nn.Module, bundle: wdata.DataBundle, *, n_hessian: int = 256,
                    probes: int = 30, eig_iters: int = 30, w_bits: Sequence[int] = (4, 3), seed: int = 0,
                    trace_tol: float = 0.05) -> list[dict[str, Any]]:
    """Curvature of one model on ``n_hessian`` training images (the loss it minimized): top
    eigenvalue, Hutchinson trace (with its standard error), sharpness and, per weight bit width,
    the sigma-weighted trace, the predicted and the measured (round-to-nearest) loss increase."""
    from .. import data as wdata
    from ..flatness import damage_table

    dev = model_device(model)
    batch = next(iter(wdata.batches(bundle.train, bundle.info, int(n_hessian), device=dev)))
    t0 = time.perf_counter()
    res = damage_table({label: model}, batch, w_bits=list(w_bits), max_probes=int(probes), trace_tol=trace_tol,
                       eig_max_iter=int(eig_iters), seed=int(seed))
    rep = res["reports"][label]
    seconds = time.perf_counter() - t0
    rows = []
    for r in res["rows"]:
        q = rep["quant"][f"W{r['w_bits']}"]
        r["label"] = r.pop("model")
        rows.append({**r, "trace_stderr": rep.get("trace", {}).get("stderr", math.nan),
                     "predicted_stderr": q.get("predicted_stderr", math.nan), "n_hessian": int(batch[0].shape[0]),
                     "hvp_method": rep.get("hvp_method"), "seconds": seconds})
    return rows


def hardware() -> str:
    """The device training ran on, in words (for the cost columns)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} thread(s)"


def member_row(trained: Any, *, model: str, seed: int, split: str, data: str,
               ptq_rows: Sequence[dict[str, Any]] = (),
               flatness_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """One tidy row per member: who it is, FP accuracy (and loss) on ``split`` (the FP32 row of
    :func:`member_ptq`), training cost and its curvature."""
    s = trained.summary()
    fp = next((r for r in ptq_rows if r["config"] == "FP32"), None)
    mc = trained.method_config
    epochs = trained.metrics.get("epochs") or 1
    row = {"model": model, "label": trained.label, "method": mc.get("method", trained.label), "seed": int(seed),
           "noise_w_bits": mc.get("w_bits"), "noise_a_bits": mc.get("a_bits"), "noise_mult": mc.get("noise_mult"),
           "data": data, "split": split,
           "fp_accuracy": fp["accuracy"] if fp else trained.metrics.get(f"{split}_accuracy", s["test_accuracy"]),
           "fp_loss": fp["loss"] if fp else trained.metrics.get(f"{split}_loss", s["test_loss"]),
           "epochs": epochs, "train_time_s": s["train_time_s"],
           "epoch_time_s": (s["train_time_s"] or math.nan) / epochs, "step_time_s": s["step_time_s"],
           "hardware": hardware()}
    for r in flatness_rows:
        b = r["w_bits"]
        row.setdefault("top_eigenvalue", r["top_eigenvalue"])
        row.setdefault("trace", r["trace"])
        row.setdefault("trace_stderr", r["trace_stderr"])
        row.setdefault("sharpness_ascent", r.get("sharpness_ascent"))
        row[f"sigma_trace_w{b}"] = r["sigma_trace"]
        row[f"predicted_increase_w{b}"] = r["predicted_increase"]
        row[f"measured_increase_w{b}"] = r["measured_increase"]
    return row
