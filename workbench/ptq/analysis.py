"""Sweeps over bit widths, observers and checkpoints, returning tidy tables (lists of dicts).

* :func:`sweep`: models x configs -> one row per (model, config), plus a full-precision row.
* :func:`wqe_vs_aqe`: which hurts more, weight quantization error (WQE) or activation
  quantization error (AQE)? Weights only, activations only, and both, at each bit width.
* :func:`sweep_checkpoints`: the thin layer the CLI uses: load checkpoints and their data,
  then :func:`sweep`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import lsq, quant
from ..errors import ConfigError
from ..tables import format_table  # noqa: F401 - re-exported: the sweep rows printer
from .engine import PTQConfig, quantize_model

logger = logging.getLogger(__name__)

#: Column order of :func:`sweep` rows.
SWEEP_COLUMNS = ("checkpoint", "method", "config", "w_bits", "a_bits", "observer", "ptq_method", "w_granularity",
                 "quant_attn", "accuracy", "loss", "calib_time_s", "eval_time_s")

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def configs_from_bits(bits: str | Sequence[Any] | None = None, *, wbits: str | Sequence[Any] | None = None,
                      abits: str | Sequence[Any] | None = None, observers: Sequence[str] | None = None,
                      attention: Sequence[bool] | None = None, base: PTQConfig | None = None,
                      **overrides: Any) -> list[PTQConfig]:
    """The one builder of PTQ setting lists (the CLI's ``--bits/--w-bits/--a-bits``, the notebooks,
    the from-scratch study).

    ``bits`` gives WbAb pairs (``"8,6,4,3"``, or ``["W4A8", "W8A32"]``); ``wbits`` x ``abits``
    adds their cartesian product (a missing side defaults to ``bits``, or to 32 = float).
    32 means 'not quantized'. Each pair is then crossed with ``observers`` and ``attention``
    (quantized attention matmuls or not), in that order, when they are given; ``overrides`` set
    any other :class:`PTQConfig` field.

    Raises:
        ConfigError: unreadable or out-of-range bit widths, nothing to sweep, or an empty
            ``observers``/``attention``.
    """
    base = (base or PTQConfig()).replace(**overrides) if overrides else (base or PTQConfig())
    pairs: list[tuple[int | None, int | None]] = []
    items = bits.split(",") if isinstance(bits, str) else list(bits or [])
    for it in items:
        it = str(it).strip()
        if it:
            pairs.append(quant.parse_bits_pair(it))
    if wbits is not None or abits is not None:
        w_list = quant.parse_bits_list(wbits, "w_bits") or [p[0] for p in pairs] or [None]
        a_list = quant.parse_bits_list(abits, "a_bits") or [p[1] for p in pairs] or [None]
        pairs += list(itertools.product(w_list, a_list))
    pairs = list(dict.fromkeys(pairs))  # keep order, drop duplicates
    pairs = [p for p in pairs if p != (None, None)]  # the FP row is always there
    if not pairs:
        raise ConfigError("nothing to sweep: give at least one bit width, e.g. --bits 8,6,4,3")
    for name, values in (("observers", observers), ("attention", attention)):
        if values is not None and not list(values):
            raise ConfigError(f"{name} needs at least one entry (or leave it out for {base.observer!r}/"
                              f"quant_attn={base.quant_attn})")
    return [base.replace(w_bits=w, a_bits=a, observer=o, quant_attn=bool(q)) for w, a in pairs
            for o in (observers if observers is not None else [base.observer])
            for q in (attention if attention is not None else [base.quant_attn])]


def _evaluate(model: nn.Module, batches: Batches, device: torch.device | str | None) -> tuple[dict, float]:
    from ..train import evaluate

    t0 = time.perf_counter()
    with torch.no_grad():
        metrics = evaluate(model, batches, device)
    return metrics, time.perf_counter() - t0


def _entries(models: Any) -> list[tuple[str, nn.Module, str]]:
    if isinstance(models, nn.Module):
        models = [("model", models)]
    elif isinstance(models, dict):
        models = list(models.items())
    out = []
    for entry in models:
        if len(entry) == 2:
            # no method given: label by name (calling everything "plain" would mislabel a dnq model)
            out.append((str(entry[0]), entry[1], str(entry[0])))
        elif len(entry) == 3:
            out.append((str(entry[0]), entry[1], str(entry[2])))
        else:
            raise ConfigError("models must be (name, model) or (name, model, method) tuples")
    return out


def sweep(models: Any, configs: Iterable[PTQConfig], calib_batches: Iterable[Any], eval_batches: Iterable[Any],
          *, include_fp: bool = True, device: torch.device | str | None = None,
          progress: bool = True, on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Quantize every model with every config and evaluate; one tidy row each.

    Args:
        models: a module, a ``{name: module}`` dict, or ``(name, model[, method])`` tuples.
        configs: the PTQ settings to try.
        calib_batches: calibration images (tensors or ``(x, y)``); materialized once and reused.
        eval_batches: ``(x, y)`` batches to evaluate on; materialized once and reused.
        include_fp: add a full-precision row per model (``config='FP32'``), and for a QAT model
            the row of its own learned quantizers (``ptq_method='qat'``).
        on_row: called with each row as soon as it is measured (a long sweep can save as it goes).

    Returns:
        Rows with the columns :data:`SWEEP_COLUMNS`; accuracy in percent, times in seconds.
    """
    from tqdm.auto import tqdm

    entries = _entries(models)
    configs = list(configs)
    calib = list(calib_batches)
    evals = list(eval_batches)
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    total = len(entries) * (len(configs) + int(include_fp))
    bar = tqdm(total=total, desc="ptq sweep", disable=not progress)
    for name, model, method in entries:
        qat_bits = lsq.bits(model)  # a QAT model: quantized by its own learned quantizers
        if include_fp:
            with lsq.disabled(model):  # full precision: a QAT model's latent weights, float inputs
                m, dt = _evaluate(model, evals, device)
            add(dict(checkpoint=name, method=method, config="FP32", w_bits=None, a_bits=None,
                             observer=None, ptq_method=None, w_granularity=None, quant_attn=None,
                             accuracy=m["accuracy"], loss=m["loss"],
                             calib_time_s=0.0, eval_time_s=dt))
            bar.update()
        if include_fp and qat_bits is not None:  # the QAT model as it is: its own learned quantizers
            m, dt = _evaluate(model, evals, device)
            w, a = qat_bits
            add(dict(checkpoint=name, method=method, config=f"W{w or 32}A{a or 32}", w_bits=w, a_bits=a,
                             observer="learned", ptq_method="qat", w_granularity="per-channel" if w else None,
                             quant_attn=False, accuracy=m["accuracy"], loss=m["loss"], calib_time_s=0.0,
                             eval_time_s=dt))
        for cfg in configs:
            qm = quantize_model(model, cfg, calib, device=device, progress=progress)
            m, dt = _evaluate(qm, evals, device)
            add(dict(checkpoint=name, method=method, config=cfg.label, w_bits=cfg.w_bits,
                             a_bits=cfg.a_bits, observer=cfg.observer, ptq_method=cfg.method,
                             w_granularity=("per-channel" if cfg.w_per_channel else "per-tensor")
                             if cfg.w_bits is not None else None,
                             quant_attn=bool(cfg.quant_attn and cfg.a_bits is not None),
                             accuracy=m["accuracy"], loss=m["loss"], calib_time_s=qm.calib_time_s,
                             eval_time_s=dt))
            logger.info("%s %s %s: %.2f%%", name, cfg.label, cfg.observer, m["accuracy"])
            bar.update()
    bar.close()
    return rows


def against_fp(rows: list[dict[str, Any]], key: str = "checkpoint") -> list[dict[str, Any]]:
    """Add ``drop`` (FP minus quantized accuracy, points) and ``loss_increase`` (quantized minus FP
    loss) to each row of a :func:`sweep`, against the ``FP32`` row of the same model (``key``).
    The rows are changed in place and returned.

    Raises:
        ConfigError: a model has no FP32 row (sweep it with ``include_fp=True``).
    """
    fp = {r[key]: r for r in rows if r["config"] == "FP32"}
    missing = sorted({str(r[key]) for r in rows} - set(map(str, fp)))
    if missing:
        raise ConfigError(f"no FP32 row for {missing}: sweep with include_fp=True to measure drops against it")
    for r in rows:
        ref = fp[r[key]]
        r["drop"] = ref["accuracy"] - r["accuracy"]
        r["loss_increase"] = r["loss"] - ref["loss"]
    return rows


def wqe_vs_aqe(model: nn.Module, calib_batches: Iterable[Any], eval_batches: Iterable[Any],
               bits: Sequence[int] = (8, 6, 4, 3), *, base: PTQConfig | None = None,
               device: torch.device | str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Which hurts more, weight (WQE) or activation (AQE) quantization error?

    For each bit width b: weights only (WbA32), activations only (W32Ab) and both (WbAb).

    Returns:
        Rows ``bits, quantized ('none'|'weights'|'activations'|'both'), w_bits, a_bits, loss,
        accuracy, d_loss, d_accuracy`` where the deltas are against full precision
        (``d_loss > 0`` and ``d_accuracy < 0`` mean damage).
    """
    base = base or PTQConfig()
    configs = []
    for b in bits:
        b = quant.check_bits(b)
        configs += [base.replace(w_bits=b, a_bits=None), base.replace(w_bits=None, a_bits=b),
                    base.replace(w_bits=b, a_bits=b)]
    rows = sweep([("model", model)], configs, calib_batches, eval_batches, device=device, progress=progress)
    fp = rows[0]
    out = [dict(bits=None, quantized="none", w_bits=None, a_bits=None, loss=fp["loss"], accuracy=fp["accuracy"],
                d_loss=0.0, d_accuracy=0.0)]
    for r in rows[1:]:
        kind = "both" if r["w_bits"] and r["a_bits"] else ("weights" if r["w_bits"] else "activations")
        out.append(dict(bits=r["w_bits"] or r["a_bits"], quantized=kind, w_bits=r["w_bits"], a_bits=r["a_bits"],
                        loss=r["loss"], accuracy=r["accuracy"], d_loss=r["loss"] - fp["loss"],
                        d_accuracy=r["accuracy"] - fp["accuracy"]))
    return out


def sweep_checkpoints(paths: Sequence[str | Path], configs: Iterable[PTQConfig], *, batch_size: int = 256,
                      device: torch.device | str | None = None, data_dir: str | Path | None = None,
                      n_eval: int | None = None, progress: bool = True, include_fp: bool = True,
                      on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """:func:`sweep` over workbench checkpoints, each calibrated and evaluated on its own dataset.

    Calibration uses the first ``n_calib`` images of the dataset's ``calib`` split (a subset of
    train, never test); evaluation the ``test`` split.

    Raises:
        CheckpointError: a path is missing or not a workbench checkpoint.
        ConfigError: a checkpoint records no dataset.
    """
    configs = list(configs)
    n_calib = max((c.n_calib for c in configs), default=256)
    rows: list[dict[str, Any]] = []
    cache: dict[tuple, Any] = {}
    for path in paths:
        model, method, calib, evals = checkpoint_data(path, n_calib, batch_size=batch_size, device=device,
                                                      data_dir=data_dir, n_eval=n_eval, cache=cache)
        rows += sweep([(str(path), model, method)], configs, calib, evals, device=device, progress=progress,
                      include_fp=include_fp, on_row=on_row)
    return rows


def checkpoint_data(path: str | Path, n_calib: int, *, batch_size: int = 256, device: torch.device | str | None = None,
                    data_dir: str | Path | None = None, n_eval: int | None = None,
                    cache: dict[tuple, Any] | None = None) -> tuple[nn.Module, str, list[Any], list[Any]]:
    """A checkpoint's model, method, calibration batches (``(x, y)``, the first ``n_calib``
    images of its dataset's ``calib`` split) and test batches, its input pipeline applied.

    Raises:
        CheckpointError: a path is missing or not a workbench checkpoint.
        ConfigError: the checkpoint records no dataset.
    """
    from ..checkpoint import load_model
    from ..data import DataInfo, batches, load, match_recorded_pipeline

    cache = {} if cache is None else cache
    model, ckpt = load_model(path, device=device or "cpu")
    info = DataInfo.from_dict(ckpt["data_info"]) if ckpt.get("data_info") else None
    if info is None:
        raise ConfigError(f"{path} records no dataset, so it cannot be calibrated and evaluated")
    key = (info.name, int((ckpt.get("train_config") or {}).get("seed", 0)))
    if key not in cache:
        cache[key] = load(info.name, data_dir=data_dir, n_calib=max(n_calib, 512), seed=key[1])
    data = match_recorded_pipeline(cache[key], ckpt["data_info"])  # the images as the model saw them
    calib = list(batches(data.calib, data.info, batch_size, limit=n_calib, device=device or "cpu"))
    evals = list(batches(data.test, data.info, batch_size, limit=n_eval, device=device or "cpu"))
    return model, (ckpt.get("method_config") or {}).get("method", "plain"), calib, evals


