"""One member of a fine-tune protocol: fine-tune a parent, then measure it, resumably.

A member's folder holds::

    run/            the fine-tune (workbench.train.fit's run folder: model.pt, run.json, history)
    member.json     what was trained and its full-precision accuracy on test and val
    ptq.csv         one row per PTQ setting and calibration draw, appended as each is measured
    curvature.json  the flatness report (trace, top eigenvalue, sigma-weighted traces, prediction)
    status.json     done, or failed with the error (a rerun retries a failed member)

Each step is skipped when its result is already there, so an interrupted member resumes at the
first missing PTQ setting, not from scratch.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..runinfo import write_csv, write_json
from .protocol import PTQSetting, Replicate

logger = logging.getLogger(__name__)

#: Offset of the calibration draws' generator seeds, so that draw ``d`` is the same images for
#: every member (pairing covers the calibration draw too) and differs from the data split's seed.
CALIB_SEED_BASE = 10_000


def member_bundle(parent_ckpt: Mapping[str, Any], *, val_size: int, split_seed: int) -> Any:
    """The parent's dataset as the parent saw it (its input pipeline), with ``val_size`` training
    images held out. ``split_seed`` fixes the held-out images for every member of a protocol."""
    from .. import data

    name = (parent_ckpt.get("data_info") or {}).get("name")
    if not name:
        from ..errors import ConfigError

        raise ConfigError("the parent checkpoint records no dataset, so it cannot be fine-tuned here")
    bundle = data.load(name, seed=split_seed, val_size=val_size, n_calib=0)
    return data.match_recorded_pipeline(bundle, parent_ckpt.get("data_info"))


def calibration_images(bundle: Any, n_calib: int, draw: int) -> list[torch.Tensor]:
    """Calibration draw ``draw``: ``n_calib`` training images (never val or test) chosen by a
    generator seeded with ``CALIB_SEED_BASE + draw``."""
    from .. import data

    gen = torch.Generator().manual_seed(CALIB_SEED_BASE + int(draw))
    idx = torch.randperm(len(bundle.train), generator=gen)[: int(n_calib)].sort().values
    split = bundle.train.subset(idx)
    return [x for x, _ in data.batches(split, bundle.info, 128)]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("accuracy", "loss", "calib_time_s", "eval_time_s"):
            if r.get(k) not in (None, ""):
                r[k] = float(r[k])
        r["draw"] = int(r["draw"])
    return rows


def _train(folder: Path, replicate: Replicate, method_fields: Mapping[str, Any], epochs: float, *,
           val_size: int, split_seed: int, progress: bool) -> dict[str, Any]:
    from ..models import finetune_recipe
    from ..precondition import MethodConfig, create_method
    from ..runinfo import prepare_run_dir, set_seed
    from ..train import TrainConfig, fit
    from ..zoo import load_init

    parent, parent_ckpt, init = load_init(replicate.parent)
    bundle = member_bundle(parent_ckpt, val_size=val_size, split_seed=split_seed)
    recipe = finetune_recipe(init["model"], epochs=epochs)
    cfg = TrainConfig.from_dict({**recipe, "seed": replicate.seed, "device": "cpu"})
    mcfg = MethodConfig.from_dict(dict(method_fields))
    set_seed(cfg.seed)
    run = prepare_run_dir(folder / "run", overwrite=True)  # a half-trained run of a crashed attempt goes
    t0 = time.perf_counter()
    result = fit(parent, bundle, cfg, create_method(mcfg), method_config=mcfg.to_dict(), out_dir=run,
                 progress=progress, init=init)
    m = result.metrics
    return {"replicate": replicate.name, "family": replicate.family, "parent": replicate.parent,
            "seed": replicate.seed, "epochs": epochs, "method_config": mcfg.to_dict(), "steps": m.get("steps"),
            "train_seconds": time.perf_counter() - t0, "parent_test_accuracy": init["metrics"].get("test_accuracy"),
            "command": command_line(replicate, method_fields, epochs, val_size)}


def command_line(replicate: Replicate, method_fields: Mapping[str, Any], epochs: float, val_size: int) -> str:
    """The ``workbench train`` command that makes the same fine-tune (the protocol also fixes
    the validation split's seed to 0, which the command's --seed would otherwise set)."""
    flags = {"w_bits": None, "a_bits": None}
    parts = ["workbench train", f"--init {replicate.parent}", f"--method {method_fields.get('method', 'plain')}"]
    if method_fields.get("method") not in (None, "plain", "sam", "swa"):
        parts.append(f"--bits W{method_fields.get('w_bits', 4) or 32}A{method_fields.get('a_bits', 8) or 32}")
    for k, v in method_fields.items():
        if k not in ("method", *flags):
            parts.append(f"--method-arg {k}={v}")
    parts += [f"--epochs {epochs:g}", f"--seed {replicate.seed}", f"--val-size {val_size}", "--out OUT"]
    return " ".join(parts)


def _fp_metrics(model: torch.nn.Module, bundle: Any, n_eval: int | None) -> dict[str, Any]:
    from .. import data, lsq
    from ..train import evaluate

    out: dict[str, Any] = {}
    tests = list(data.batches(bundle.test, bundle.info, 500, limit=n_eval))
    with lsq.disabled(model):
        m = evaluate(model, tests)
        out.update(test_accuracy=m["accuracy"], test_loss=m["loss"])
        if len(bundle.val):
            v = evaluate(model, data.batches(bundle.val, bundle.info, 500))
            out.update(val_accuracy=v["accuracy"], val_loss=v["loss"])
    if lsq.has_quantizers(model):  # QAT: its own learned quantizers, as trained
        m = evaluate(model, tests)
        out.update(qat_own_accuracy=m["accuracy"], qat_own_loss=m["loss"])
    return out


def measure_ptq(model: torch.nn.Module, bundle: Any, settings: Sequence[PTQSetting], done: set[str], *,
                n_calib: int, split: str, n_eval: int | None, on_row: Any) -> None:
    """Quantize ``model`` with every setting not in ``done`` (keys ``label#draw``) and evaluate on
    ``split``; ``on_row`` gets each row as it is measured."""
    from .. import data
    from ..ptq import PTQConfig, not_applicable, sweep
    from ..quant import parse_bits_pair

    evals = list(data.batches(bundle.split(split), bundle.info, 500, limit=n_eval if split == "test" else None))
    todo = [s for s in settings if s.key not in done]
    for draw in sorted({s.draw for s in todo}):
        group = [s for s in todo if s.draw == draw]
        configs, kept = [], []
        for s in group:
            w, a = parse_bits_pair(s.bits)
            cfg = PTQConfig(w_bits=w, a_bits=a, n_calib=n_calib, **s.fields)
            why = not_applicable(cfg, model)
            if why:  # e.g. RepQ on a CNN: recorded as not applicable, not silently missing
                on_row({"setting": s.label, "bits": s.bits, "column": s.column, "draw": s.draw, "split": split,
                        "accuracy": math.nan, "loss": math.nan, "note": why})
                continue
            configs.append(cfg)
            kept.append(s)
        if not configs:
            continue
        calib = calibration_images(bundle, n_calib, draw)
        it = iter(kept)

        def save(row: dict[str, Any], it: Any = it) -> None:  # rows come in the order of `kept`
            s = next(it)
            on_row({"setting": s.label, "bits": s.bits, "column": s.column, "draw": s.draw, "split": split,
                    "ptq_method": row["ptq_method"], "quant_attn": row["quant_attn"], "accuracy": row["accuracy"],
                    "loss": row["loss"], "calib_time_s": row["calib_time_s"], "eval_time_s": row["eval_time_s"],
                    "note": ""})

        sweep([("member", model)], configs, calib, evals, include_fp=False, progress=False, on_row=save)


def curvature_report(model: torch.nn.Module, bundle: Any, spec: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The flatness report of the fine-tuned model (full precision) on ``n_hessian`` training images."""
    from .. import data, lsq
    from ..flatness import flatness_report

    n = int(spec.get("n_hessian", 256))
    batch = next(iter(data.batches(bundle.train, bundle.info, n)))
    if lsq.has_quantizers(model):  # QAT: the curvature of its latent weights, without the quantizers' steps
        model = copy.deepcopy(model)
        lsq.detach_quantizers(model)
    with lsq.disabled(model):
        rep = flatness_report(model, batch, w_bits=[int(b) for b in spec.get("w_bits", [4, 3])],
                              max_probes=int(spec.get("max_probes", 20)), eig_max_iter=int(spec.get("eig_iters", 30)),
                              trace_deflate=int(spec.get("deflate", 20)), sharpness=False, seed=seed)
    rep["n_hessian"] = n
    return rep


def run_member(folder: str | Path, replicate: Replicate, method_fields: Mapping[str, Any], epochs: float, *,
               settings: Sequence[PTQSetting] = (), val_settings: Sequence[PTQSetting] = (), n_calib: int = 128,
               val_size: int = 1000, split_seed: int = 0, n_eval: int | None = None,
               curvature: Mapping[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Fine-tune (unless done) and measure whatever is missing. Never raises for a member's own
    failure: ``status.json`` records it and the returned dict says ``failed``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        from ..checkpoint import load_model
        from ..zoo import load_init

        info_path = folder / "member.json"
        if not (folder / "run" / "model.pt").is_file() or not info_path.is_file():
            info = _train(folder, replicate, method_fields, epochs, val_size=val_size, split_seed=split_seed,
                          progress=progress)
        else:
            import json

            info = json.loads(info_path.read_text())
        model, _ = load_model(folder / "run" / "model.pt")
        model.eval()
        _, parent_ckpt, _ = load_init(replicate.parent)
        bundle = member_bundle(parent_ckpt, val_size=val_size, split_seed=split_seed)
        if "test_accuracy" not in info:
            info.update(_fp_metrics(model, bundle, n_eval))
            write_json(info_path, info)
        path = folder / "ptq.csv"
        rows = read_rows(path)

        def add(row: dict[str, Any]) -> None:
            rows.append(row)
            write_csv(path, rows)

        for split, group in (("val", val_settings), ("test", settings)):
            done = {f"{r['setting']}#{r['draw']}" for r in rows if r["split"] == split}
            measure_ptq(model, bundle, group, done, n_calib=n_calib, split=split, n_eval=n_eval, on_row=add)
        if curvature and not (folder / "curvature.json").is_file():
            write_json(folder / "curvature.json", curvature_report(model, bundle, curvature, replicate.seed))
        status = {"status": "done", "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001  (a member's failure is recorded, the protocol goes on)
        logger.error("member %s failed: %s", folder, e)
        status = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-4000:], "seconds": time.perf_counter() - t0}
    write_json(folder / "status.json", status)
    return {"folder": str(folder), **status}
