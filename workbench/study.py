"""The reproduction study: does pre-conditioning make low-bit PTQ survive? Measured, with seeds.

A study is two sweeps of the member notebook (``notebooks/06_study_member.ipynb``: train one
model with one method and seed, quantize it at every bit setting, measure its flatness):

1. ``search`` (optional): candidate noise multipliers trained on the training split minus a
   held-out validation split and judged there (never on the test split). The chosen value is
   the one with the best quantized validation accuracy among candidates whose full-precision
   validation accuracy stays within ``max_fp_loss`` points of the reference (``plain``) run.
2. the main sweep (``parameters``, ``grid``, ``include`` exactly as in a sweep file), with the
   chosen values filled into ``parameters``.

Then :func:`write_report` turns the two sweep folders into tidy CSVs, plotly figures and a
Markdown report (mean ± std over seeds), optionally spliced into ``docs/results.md`` between
``<!-- study:begin -->`` and ``<!-- study:end -->`` so hand-written discussion around it stays.

    workbench study run docs/study/cpu.yaml --out runs/study-cpu --jobs 2 \\
        --dest docs/results/study-cpu --md docs/results.md
    workbench study report runs/study-cpu --dest docs/results/study-cpu --md docs/results.md

The member-side helpers (:func:`ptq_grid`, :func:`member_ptq`, :func:`member_flatness`,
:func:`member_row`) are what the member notebook calls.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RunDirError
from .runinfo import atomic_write_text, prepare_run_dir, run_metadata, write_csv, write_json

if TYPE_CHECKING:  # torch and the data module load inside the member functions: the CLI's parser
    from torch import nn  # imports this module, and `workbench --help` should not pay for torch

    from . import data as wdata

log = logging.getLogger(__name__)

#: The notebook every study member executes.
MEMBER_NOTEBOOK = "06_study_member"
#: The PTQ settings of the protocol (W2A4 shows whether anything survives 2-bit weights).
DEFAULT_BITS = ("W8A8", "W6A6", "W4A8", "W4A4", "W3A3", "W2A4")
#: Markers in a Markdown file between which :func:`write_report` puts the generated tables.
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
_STUDY_KEYS = {"description", "notebook", "parameters", "grid", "include", "search"}
_SEARCH_KEYS = {"parameters", "grid", "include", "select"}


# ---------------------------------------------------------------------------------------
# one member (called by the member notebook)


def parse_config(label: str) -> tuple[int | None, int | None]:
    """``'W4A8'`` -> ``(4, 8)``; 32 means left in floating point (:func:`workbench.quant.parse_bits_pair`).

    Raises:
        ConfigError: unreadable, or bits out of range.
    """
    from .quant import parse_bits_pair

    return parse_bits_pair(label)


def ptq_grid(bits: Sequence[str], observers: Sequence[str] = ("minmax",),
             attention: Sequence[bool] = (True,), n_calib: int = 256) -> list[Any]:
    """PTQConfigs for every bit setting x activation observer x attention-matmul choice
    (per-channel symmetric weights, asymmetric per-tensor activations: the engine's defaults)."""
    from .ptq import PTQConfig

    if not bits or not observers or not attention:
        raise ConfigError("bits, observers and attention each need at least one entry")
    return [PTQConfig(w_bits=w, a_bits=a, observer=obs, quant_attn=bool(att), n_calib=n_calib)
            for w, a in (parse_config(b) for b in bits) for obs in observers for att in attention]


def member_data(data: str, *, seed: int = 0, val_size: int | float = 0, limit_train: int | None = None,
                limit_test: int | None = None, n_calib: int = 256) -> wdata.DataBundle:
    """The member's data: ``val_size`` images held out of training as ``val`` (the search judges
    candidates there), then the usual limits and calibration subset (from the remaining training images)."""
    from . import data as wdata
    from .nbtools import subset_bundle

    bundle = wdata.load(data, seed=seed, n_calib=max(int(n_calib), 1), val_size=val_size)
    return subset_bundle(bundle, limit_train, limit_test, n_calib, seed)


def train_member(bundle: wdata.DataBundle, *, model: str, method: str, label: str | None = None,
                 model_args: Mapping[str, Any] | None = None, w_bits: int | None = 4, a_bits: int | None = 4,
                 noise_mult: float = 1.0, method_args: Mapping[str, Any] | None = None, epochs: int | None = None,
                 train_args: Mapping[str, Any] | None = None, batch_size: int | None = None, seed: int = 0,
                 device: str = "cpu", out_dir: str | Path | None = None, progress: bool = True) -> Any:
    """Train one member with the model's recipe (:data:`workbench.models.RECIPES`), ``epochs``,
    ``batch_size`` and ``train_args`` on top. Returns a :class:`workbench.nbtools.Trained`."""
    from .models import default_recipe
    from .nbtools import train_methods

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
    from . import data as wdata
    from .ptq import sweep

    dev = next(model.parameters()).device
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
    rows = sweep([(label, model, method)], configs, calib, evals, progress=progress)
    fp = next(r for r in rows if r["config"] == "FP32")
    for r in rows:
        r["label"] = r.pop("checkpoint")
        r["split"] = split
        r["drop"] = fp["accuracy"] - r["accuracy"]
        r["loss_increase"] = r["loss"] - fp["loss"]
    return rows


def member_flatness(label: str, model: nn.Module, bundle: wdata.DataBundle, *, n_hessian: int = 256,
                    probes: int = 30, eig_iters: int = 30, w_bits: Sequence[int] = (4, 3), seed: int = 0,
                    trace_tol: float = 0.05) -> list[dict[str, Any]]:
    """Curvature of one model on ``n_hessian`` training images (the loss it minimized): top
    eigenvalue, Hutchinson trace (with its standard error), sharpness and, per weight bit width,
    the sigma-weighted trace, the predicted and the measured (round-to-nearest) loss increase."""
    from . import data as wdata
    from .flatness import damage_table

    dev = next(model.parameters()).device
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


# ---------------------------------------------------------------------------------------
# study files and running


def load_study(path: str | Path) -> dict[str, Any]:
    """Read and check a study file (see the module docstring).

    Raises:
        ConfigError: unreadable YAML, unknown keys, or a malformed ``search``.
    """
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read study file {path}: {e}") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a study file is a mapping with parameters, grid, include and search")
    unknown = sorted(set(spec) - _STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; use {', '.join(sorted(_STUDY_KEYS))}")
    spec = {"notebook": MEMBER_NOTEBOOK, "parameters": {}, "grid": {}, "include": [], "description": "", **spec}
    search = spec.get("search")
    if search is not None:
        if not isinstance(search, dict) or not isinstance(search.get("grid"), dict) or not search["grid"]:
            raise ConfigError(f"{path}: 'search' needs a 'grid' of candidate values (e.g. noise_mult: [0.5, 1, 2])")
        bad = sorted(set(search) - _SEARCH_KEYS)
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {bad} in 'search'; use {', '.join(sorted(_SEARCH_KEYS))}")
        select = {"config": "W4A4", "observer": "minmax", "reference": "plain", "max_fp_loss": 0.5,
                  **(search.get("select") or {})}
        parse_config(select["config"])
        search["select"] = select
    return spec


def _sweep_file(dest: Path, spec: Mapping[str, Any], description: str) -> Path:
    import yaml

    body = {"description": description, "notebook": spec["notebook"], "parameters": dict(spec.get("parameters") or {}),
            "grid": dict(spec.get("grid") or {})}
    if spec.get("include"):
        body["include"] = list(spec["include"])
    atomic_write_text(dest, yaml.safe_dump(body, sort_keys=False))
    return dest


def run_study(study_file: str | Path, out: str | Path, *, jobs: int = 1, dest: str | Path | None = None,
              md: str | Path | None = None, search_from: str | Path | None = None, progress: bool = True,
              **sweep_kwargs: Any) -> dict[str, Any]:
    """Run the search (if any), pick its values, run the main sweep, write the report.

    ``search_from``: an earlier study folder whose finished search is reused (copied into ``out``,
    values selected again by this file's rule) instead of searching again, e.g. to rerun the main
    sweep with more seeds. ``sweep_kwargs`` go to :func:`workbench.runner.run_sweep` (e.g. ``engine``, ``html``).

    Returns:
        ``{"out", "selected", "search", "main", "report"}``.

    Raises:
        ConfigError: a bad study file; RunDirError: ``out`` is not new or empty.
    """
    from .runner import resolve_notebook, run_sweep

    spec = load_study(study_file)
    nb = spec["notebook"]
    if not Path(str(nb)).is_absolute() and (Path(study_file).parent / str(nb)).is_file():
        nb = Path(study_file).parent / str(nb)
    nb = resolve_notebook(nb)
    if search_from is not None and not (Path(search_from) / "search" / "sweep.json").is_file():
        raise RunDirError(f"{search_from} has no finished search (no search/sweep.json)")
    out = prepare_run_dir(out)
    # run a copy: editing the notebook during a long study must not change members still to come
    (out / "notebook").mkdir()
    spec["notebook"] = str(shutil.copy2(nb, out / "notebook" / nb.name))
    write_json(out / "study.json", {**run_metadata({"study_file": str(study_file), "jobs": jobs}),
                                    "kind": "study", "spec": spec})
    result: dict[str, Any] = {"out": str(out), "selected": {}}
    base = dict(spec["parameters"])
    if spec.get("search") and search_from is not None:
        s = spec["search"]
        src = Path(search_from) / "search"
        shutil.copytree(src, out / "search")
        choice = select_search(out / "search", s["select"], list(s["grid"]))
        write_json(out / "selected.json", {**choice, "reused_from": str(search_from)})
        result["selected"] = choice["values"]
        base.update(choice["values"])
    elif spec.get("search"):
        s = spec["search"]
        search_spec = {"notebook": spec["notebook"], "parameters": {**base, **(s.get("parameters") or {})},
                       "grid": s["grid"], "include": s.get("include") or []}
        f = _sweep_file(out / "search.yaml", search_spec, "noise multiplier search on a validation split")
        result["search"] = run_sweep(f, out / "search", jobs=jobs, progress=progress, report=False, **sweep_kwargs)
        choice = select_search(out / "search", s["select"], list(s["grid"]))
        write_json(out / "selected.json", choice)
        result["selected"] = choice["values"]
        base.update(choice["values"])
    f = _sweep_file(out / "main.yaml", {**spec, "parameters": base}, spec.get("description") or "study")
    result["main"] = run_sweep(f, out / "main", jobs=jobs, progress=progress, report=False, **sweep_kwargs)
    result["report"] = {k: str(v) for k, v in write_report(out, dest=dest, md=md).items()}
    return result


def _extra_ptq_job(args: dict[str, Any]) -> dict[str, Any]:
    """One member's added PTQ settings (top-level so it pickles for the process pool)."""
    import json

    import torch

    from .checkpoint import load_model

    torch.set_num_threads(int(args["threads"]))
    res = Path(args["results"])
    p = json.loads((res / "run.json").read_text(encoding="utf-8"))["params"]
    member = _read_rows(res / "member.json")[0]
    model, _ = load_model(res / "checkpoints" / member["label"] / "model.pt")
    bundle = member_data(p["data"], seed=p["seed"], val_size=p.get("val_size", 0), limit_train=p["limit_train"],
                         limit_test=p["limit_test"], n_calib=p["n_calib"])
    configs = ptq_grid(args["bits"], args["observers"], args["attention"], n_calib=p["n_calib"])
    rows = member_ptq(member["label"], model, member["method"], bundle, configs, split=member["split"],
                      n_calib=p["n_calib"])
    write_json(res / f"ptq_{args['tag']}.json", rows)
    return {"job": res.parent.name, "sweep": res.parent.parent.parent.name, "rows": len(rows) - 1}


def add_ptq(folder: str | Path, *, bits: Sequence[str] = DEFAULT_BITS, observers: Sequence[str] = ("mse",),
            attention: Sequence[bool] = (True,), jobs: int = 1, tag: str | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
    """Quantize a finished study's trained members again with more settings (e.g. another observer),
    from their saved checkpoints and recorded data parameters: no retraining. Each member gets a
    ``ptq_<tag>.json`` beside its ``ptq.json``; :func:`collect_sweep` and the report read both.

    Raises:
        RunDirError: no finished member in ``folder/main``; a member's ``ptq_<tag>.json`` exists.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    ptq_grid(bits, observers, attention)  # check the settings before any work
    tag = tag or "_".join(observers)
    folder = Path(folder)
    sweeps = [folder / "main", *sorted(folder.glob("main-*"))]
    results = sorted(d / "results" for sw in sweeps for d in (sw / "jobs").glob("*")
                     if (d / "results" / "member.json").is_file())
    if not results:
        raise RunDirError(f"{folder}: no finished study member under main/jobs")
    done = [r for r in results if (r / f"ptq_{tag}.json").exists()]
    if done:
        raise RunDirError(f"{done[0]} already has ptq_{tag}.json; pass another tag")
    threads = max(1, (os.cpu_count() or 1) // int(jobs))
    tasks = [{"results": str(r), "bits": list(bits), "observers": list(observers), "attention": list(attention),
              "tag": tag, "threads": threads} for r in results]
    out = []
    with ProcessPoolExecutor(int(jobs), mp_context=get_context("spawn")) as pool:
        for row in tqdm(pool.map(_extra_ptq_job, tasks), total=len(tasks), desc=f"ptq {tag}", disable=not progress):
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------
# collecting


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import json

    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def collect_sweep(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The members, PTQ rows and flatness rows of one study sweep folder, each tagged with ``job``.

    Members that failed (no ``member.json``) are listed under ``failed``.
    """
    import json

    folder = Path(folder)
    if not (folder / "sweep.json").is_file():
        raise RunDirError(f"{folder} is not a sweep folder (no sweep.json)")
    status = {r.get("job"): r for r in _read_rows(folder / "summary.json")}
    out: dict[str, list[dict[str, Any]]] = {"members": [], "ptq": [], "flatness": [], "failed": []}
    meta = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    points = meta.get("points") or []
    for job_dir in sorted(p for p in (folder / "jobs").glob("*") if p.is_dir()):
        job = job_dir.name
        res = job_dir / "results"
        members = _read_rows(res / "member.json")
        point = points[int(job)] if job.isdigit() and int(job) < len(points) else {}
        if not members:
            st = status.get(job, {})
            out["failed"].append({"job": job, **point, "status": st.get("status", "missing"),
                                  "error": st.get("message", "no member.json")})
            continue
        m = members[0]
        key = {"job": job, "model": m["model"], "label": m["label"], "seed": m["seed"]}
        out["members"].append({"job": job, **m, "point": point})
        for f in [res / "ptq.json", *sorted(res.glob("ptq_*.json"))]:  # ptq_*: settings added later
            out["ptq"] += [{**key, **r} for r in _read_rows(f) if f.name == "ptq.json" or r["config"] != "FP32"]
        out["flatness"] += [{**key, **r, "label": m["label"]} for r in _read_rows(res / "flatness.json")]
    return out


def collect_study(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """:func:`collect_sweep` over a study's ``main`` sweep and any ``main-*`` sweeps added to it later
    (e.g. more seeds for some methods); job ids of the added sweeps are prefixed with their folder name."""
    folder = Path(folder)
    sweeps = [folder / "main", *sorted(p for p in folder.glob("main-*") if (p / "sweep.json").is_file())]
    out: dict[str, list[dict[str, Any]]] = {"members": [], "ptq": [], "flatness": [], "failed": []}
    for sw in sweeps:
        got = collect_sweep(sw)
        prefix = "" if sw.name == "main" else f"{sw.name}/"
        for key, rows in got.items():
            out[key] += [{**r, "job": prefix + r["job"]} for r in rows]
    return out


def select_search(folder: str | Path, select: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Pick the searched values: best quantized validation accuracy at ``select['config']``
    among candidates whose FP accuracy is within ``max_fp_loss`` of the reference method's.

    Returns:
        ``{"values": {key: value}, "table": rows, "rule": text, "constrained": bool}``.

    Raises:
        RunDirError: no candidate finished.
    """
    got = collect_sweep(folder)
    cfg, obs, ref = select["config"], select.get("observer", "minmax"), select.get("reference", "plain")
    max_loss = float(select.get("max_fp_loss", math.inf))
    by_job = {m["job"]: m for m in got["members"]}
    quant = {r["job"]: r["accuracy"] for r in got["ptq"]
             if r["config"] == cfg and r.get("observer") == obs and r.get("quant_attn") in (True, None)}
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    ref_fp = [m["fp_accuracy"] for m in got["members"] if m["method"] == ref]
    for job, m in by_job.items():
        if m["method"] == ref or job not in quant:
            continue
        values = tuple((m.get("point") or {}).get(k, m.get(k)) for k in keys)
        groups[(m["label"], values)].append({"fp": m["fp_accuracy"], "q": quant[job]})
    if not groups:
        raise RunDirError(f"{folder}: no search candidate finished; see its summary.json")
    ref_mean = statistics.fmean(ref_fp) if ref_fp else None
    table = []
    for (label, values), rs in groups.items():
        fp, q = statistics.fmean(r["fp"] for r in rs), statistics.fmean(r["q"] for r in rs)
        ok = ref_mean is None or fp >= ref_mean - max_loss
        table.append({"label": label, **dict(zip(keys, values)), "val_fp_accuracy": fp,
                      f"val_{cfg}_accuracy": q, "reference_fp_accuracy": ref_mean, "eligible": ok})
    ref_q = [quant[j] for j, m in by_job.items() if m["method"] == ref and j in quant]
    reference_row = ({"label": f"{ref} (reference)", **{k: None for k in keys}, "val_fp_accuracy": ref_mean,
                      f"val_{cfg}_accuracy": statistics.fmean(ref_q) if ref_q else math.nan,
                      "reference_fp_accuracy": ref_mean, "eligible": None} if ref_fp else None)
    eligible = [r for r in table if r["eligible"]]
    constrained = bool(eligible)
    best = max(eligible or table, key=lambda r: r[f"val_{cfg}_accuracy"])
    for r in table:
        r["chosen"] = r is best
    if reference_row is not None:
        table.append({**reference_row, "chosen": False})
    rule = (f"highest validation accuracy at {cfg} ({obs} observer) among candidates whose FP validation "
            f"accuracy is within {max_loss:g} points of {ref!r}"
            + ("" if constrained else "; none qualified, so the best overall was taken"))
    return {"values": {k: best[k] for k in keys}, "table": table, "rule": rule, "constrained": constrained}


# ---------------------------------------------------------------------------------------
# aggregating


def _ms(values: Iterable[float]) -> tuple[float, float, int]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _order(labels: Iterable[str]) -> list[str]:
    pref = ["plain", "wnoise", "anoise", "dnq", "uniform", "sam", "swa"]
    labels = list(dict.fromkeys(labels))
    return sorted(labels, key=lambda x: (pref.index(x) if x in pref else len(pref), x))


def summarize(got: Mapping[str, list[dict[str, Any]]], bits: Sequence[str] = DEFAULT_BITS) -> dict[str, Any]:
    """Mean ± std over seeds: one row per (model, label) for FP, each PTQ setting (min-max and the
    other observers, with and without attention matmuls), curvature and cost."""
    members, ptq = got["members"], got["ptq"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for m in members:
        groups[(m["model"], m["label"])].append(m)
    rows = []
    for model in dict.fromkeys(m["model"] for m in members):
        labels = _order(lbl for (mod, lbl) in groups if mod == model)
        sam_time = _ms(m["epoch_time_s"] for m in groups.get((model, "sam"), []))[0]
        plain_time = _ms(m["epoch_time_s"] for m in groups.get((model, "plain"), []))[0]
        for label in labels:
            ms = groups[(model, label)]
            jobs = {m["job"] for m in ms}
            row: dict[str, Any] = {"model": model, "label": label, "method": ms[0]["method"], "seeds": len(ms)}
            for key in ("fp_accuracy", "epoch_time_s", "trace", "top_eigenvalue", "sigma_trace_w4",
                        "predicted_increase_w4", "measured_increase_w4", "predicted_increase_w3",
                        "measured_increase_w3"):
                mean, std, _ = _ms(m.get(key) for m in ms)
                row[key], row[f"{key}_std"] = mean, std
            row["time_vs_plain"] = row["epoch_time_s"] / plain_time if plain_time else math.nan
            row["time_vs_sam"] = row["epoch_time_s"] / sam_time if sam_time else math.nan
            for obs in dict.fromkeys(r.get("observer") for r in ptq if r.get("observer")):
                for att in (True, False):
                    for b in bits:
                        sel = [r for r in ptq if r["job"] in jobs and r["config"] == b and r.get("observer") == obs
                               and bool(r.get("quant_attn")) == att]
                        if not sel:
                            continue
                        tag = f"{b}_{obs}" + ("" if att else "_noattn")
                        for key in ("accuracy", "drop"):
                            mean, std, _ = _ms(r[key] for r in sel)
                            row[f"{tag}_{key}"], row[f"{tag}_{key}_std"] = mean, std
                        row[f"{tag}_values"] = [r["accuracy"] for r in sel]
            rows.append(row)
    return {"rows": rows}


def spearman_table(got: Mapping[str, list[dict[str, Any]]], config: str = "W4A4") -> list[dict[str, Any]]:
    """Rank correlation (per model family, over members) of each curvature measure with the measured
    damage: the weight-only loss increase at W4/W3 and the accuracy drop at ``config`` (min-max)."""
    from .stats import MIN_RANK_POINTS, spearman

    out = []
    drop = {r["job"]: r["drop"] for r in got["ptq"] if r["config"] == config and r.get("observer") == "minmax"
            and r.get("quant_attn") in (True, None)}
    for model in dict.fromkeys(m["model"] for m in got["members"]):
        ms = [m for m in got["members"] if m["model"] == model]
        for target, ys in (("measured_increase_w4", [m.get("measured_increase_w4") for m in ms]),
                           ("measured_increase_w3", [m.get("measured_increase_w3") for m in ms]),
                           (f"{config}_drop", [drop.get(m["job"], math.nan) for m in ms])):
            ys = [math.nan if y is None else float(y) for y in ys]
            row = {"model": model, "damage": target, "members": len(ms)}
            for measure in ("top_eigenvalue", "trace", "sigma_trace_w4", "predicted_increase_w4",
                            "predicted_increase_w3", "sharpness_ascent"):
                xs = [math.nan if m.get(measure) is None else float(m[measure]) for m in ms]
                valid = sum(not (math.isnan(x) or math.isnan(y)) for x, y in zip(xs, ys))
                # over fewer than 5 members a rank correlation is +-1 or nearly so by chance: none is printed
                row[measure] = spearman(xs, ys) if valid >= MIN_RANK_POINTS else math.nan
            out.append(row)
    return out


def effect_cells(e: Mapping[str, Any]) -> dict[str, Any]:
    """A paired effect with its difference and interval as table text (no interval for one pair)."""
    ci = "-" if e["n_pairs"] < 2 else f"[{e['diff_ci_low']:+.2f}, {e['diff_ci_high']:+.2f}]"
    return {**e, "diff": f"{e['diff_mean']:+.2f}", "ci": ci}


def paired_effects(got: Mapping[str, list[dict[str, Any]]], model: str, bits: Sequence[str] = ("W4A4", "W3A3"),
                   observer: str = "minmax") -> list[dict[str, Any]]:
    """Each method against ``plain`` of the same seed (replacing the project's old pass/fail
    targets): the paired accuracy difference at FP and ``bits`` (``observer``, attention matmuls
    quantized) with its 95 % t interval and verdict (:func:`workbench.stats.paired_summary`)."""
    from .stats import paired_summary

    members = {m["job"]: m for m in got["members"] if m["model"] == model}
    rows = []
    for r in got["ptq"]:
        m = members.get(r["job"])
        if m is None:
            continue
        if r["config"] == "FP32" or (r["config"] in bits and r.get("observer") == observer
                                     and bool(r.get("quant_attn", True))):
            rows.append({"arm": m["label"], "seed": m["seed"], "config": r["config"], "accuracy": r["accuracy"]})
    out = [r for r in paired_summary(rows, by=("config",)) if "diff_mean" in r]
    order = {c: i for i, c in enumerate(("FP32", *bits))}
    labels = _order(r["arm"] for r in out)
    return sorted(out, key=lambda r: (order.get(r["config"], 99), labels.index(r["arm"])))


# ---------------------------------------------------------------------------------------
# report


def _md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key, "")
            if v is None:
                v = "–"
            elif isinstance(v, bool):
                v = "yes" if v else "no"
            elif isinstance(v, float):
                v = "–" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1e4 else f"{v:.2f}")
            cells.append(str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def _num(v: float, digits: int | None) -> str:
    if digits is not None:
        return f"{v:.{digits}f}"
    return f"{v:.3g}" if abs(v) < 1 or abs(v) >= 1e4 else f"{v:.4g}"


def _pm_col(rows: Sequence[dict[str, Any]], key: str, digits: int | None = 2) -> list[str]:
    out = []
    for r in rows:
        m, s = r.get(key, math.nan), r.get(f"{key}_std")
        if m is None or (isinstance(m, float) and math.isnan(m)):
            out.append("–")
        elif r.get("seeds", 1) > 1 and s is not None and not math.isnan(s):
            out.append(f"{_num(m, digits)} ± {_num(s, digits)}")
        else:
            out.append(_num(m, digits))
    return out


def _pm_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], digits: int | None = 2,
              keep: Sequence[tuple[str, str]] = (("label", "method"),)) -> str:
    present = [(k, t) for k, t in columns if any(not (isinstance(r.get(k), float) and math.isnan(r[k]))
                                                  and r.get(k) is not None for r in rows)]
    cols = [_pm_col(rows, k, digits) for k, _ in present]
    table = [{**{k: r.get(k) for k, _ in keep}, **{t: c[i] for (_, t), c in zip(present, cols)}}
             for i, r in enumerate(rows)]
    return _md_table(table, [*keep, *((t, t) for _, t in present)])


def study_figures(got: Mapping[str, list[dict[str, Any]]], summary: Sequence[dict[str, Any]],
                  bits: Sequence[str] = DEFAULT_BITS) -> dict[str, Any]:
    """Accuracy vs bits per method, trace vs W4A4 drop, predicted vs measured damage (plotly)."""
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = [r for r in summary if r["model"] == model]
        fig = go.Figure()
        xs = ["FP32", *[b for b in bits if any(f"{b}_minmax_accuracy" in r for r in rows)]]
        for r in rows:
            ys = [r["fp_accuracy"], *[r.get(f"{b}_minmax_accuracy", math.nan) for b in xs[1:]]]
            es = [r["fp_accuracy_std"], *[r.get(f"{b}_minmax_accuracy_std", math.nan) for b in xs[1:]]]
            fig.add_trace(go.Scatter(x=xs, y=ys, error_y={"type": "data", "array": es}, mode="lines+markers",
                                     name=r["label"]))
        fig.update_layout(title=f"{model}: test accuracy after PTQ (min-max, mean ± std over seeds)",
                          xaxis_title="setting", yaxis_title="accuracy (%)", template="plotly_white")
        figs[f"accuracy_vs_bits_{model}"] = fig
        members = [m for m in got["members"] if m["model"] == model]
        drop = {r["job"]: r["drop"] for r in got["ptq"] if r["config"] == "W4A4" and r.get("observer") == "minmax"
                and r.get("quant_attn") in (True, None)}
        fig = go.Figure()
        for label in _order(m["label"] for m in members):
            ms = [m for m in members if m["label"] == label]
            fig.add_trace(go.Scatter(x=[m.get("trace") for m in ms], y=[drop.get(m["job"]) for m in ms],
                                     mode="markers", name=label, marker={"size": 10},
                                     text=[f"seed {m['seed']}" for m in ms]))
        fig.update_layout(title=f"{model}: Hessian trace vs accuracy lost at W4A4", xaxis_title="Hessian trace",
                          yaxis_title="W4A4 accuracy drop (points)", xaxis_type="log", template="plotly_white")
        figs[f"trace_vs_drop_{model}"] = fig
        fig = go.Figure()
        for b in (4, 3):
            xs_, ys_ = [m.get(f"predicted_increase_w{b}") for m in members], [m.get(f"measured_increase_w{b}")
                                                                                for m in members]
            fig.add_trace(go.Scatter(x=xs_, y=ys_, mode="markers", name=f"W{b}",
                                     text=[f"{m['label']} seed {m['seed']}" for m in members]))
        vals = [v for m in members for b in (4, 3) for v in (m.get(f"predicted_increase_w{b}"),
                                                              m.get(f"measured_increase_w{b}"))
                if v is not None and v > 0]
        if vals:
            lo, hi = min(vals), max(vals)
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = measured",
                                     line={"dash": "dash", "color": "gray"}))
        fig.update_layout(title=f"{model}: predicted (½ Σ σ² H_ii) vs measured loss increase, weights only",
                          xaxis_title="predicted", yaxis_title="measured", xaxis_type="log", yaxis_type="log",
                          template="plotly_white")
        figs[f"predicted_vs_measured_{model}"] = fig
    return figs


def write_report(folder: str | Path, *, dest: str | Path | None = None, md: str | Path | None = None,
                 bits: Sequence[str] = DEFAULT_BITS) -> dict[str, Path]:
    """Tables (CSV), figures (HTML + JSON) and ``results.md`` of a study folder, in ``dest``
    (default ``folder/report``); with ``md``, the generated Markdown also replaces the block between
    :data:`BEGIN` and :data:`END` in that file (created if missing), links relative to it.

    Raises:
        RunDirError: no ``main`` sweep with a finished member in ``folder``.
    """
    import json

    from . import plots

    folder = Path(folder)
    dest = Path(dest) if dest is not None else folder / "report"
    dest.mkdir(parents=True, exist_ok=True)
    main = collect_study(folder)
    if not main["members"]:
        raise RunDirError(f"{folder}: no study member finished; see {folder / 'main' / 'summary.json'}")
    study = json.loads((folder / "study.json").read_text()) if (folder / "study.json").is_file() else {}
    selected = json.loads((folder / "selected.json").read_text()) if (folder / "selected.json").is_file() else None
    summary = summarize(main, bits)["rows"]
    rho = spearman_table(main)
    write_csv(dest / "members.csv", main["members"])
    write_csv(dest / "ptq.csv", main["ptq"])
    write_csv(dest / "flatness.csv", main["flatness"])
    write_csv(dest / "summary.csv", [{k: v for k, v in r.items() if not k.endswith("_values")} for r in summary])
    write_csv(dest / "spearman.csv", rho)
    if selected:
        write_csv(dest / "search.csv", selected["table"])
    if main["failed"]:
        write_csv(dest / "failed.csv", main["failed"])
    figs = study_figures(main, summary, bits)
    for name, fig in figs.items():
        plots.save_figure(fig, dest / "figures" / name, formats=("html", "json"), include_plotlyjs="directory")
    base = Path(md).parent if md is not None else dest
    rel = os.path.relpath(dest, base)

    def link(name: str) -> str:
        return f"[{name}]({Path(rel, 'figures', name + '.html').as_posix()})"

    git = study.get("git") or {}
    hw = sorted({m["hardware"] for m in main["members"]})
    models = list(dict.fromkeys(m["model"] for m in main["members"]))
    seeds = sorted({m["seed"] for m in main["members"]})
    targets_bits = sorted({f"W{m['noise_w_bits']}A{m['noise_a_bits']}" for m in main["members"]
                           if m["method"] != "plain"})
    lines = [BEGIN, "",
             f"_Generated by `workbench study report` from `{folder.name}` (git commit "
             f"`{str(git.get('commit'))[:10]}`{' dirty' if git.get('dirty') else ''}); tables as CSV in "
             f"[`{rel}`]({rel}). Do not edit between the study markers: regenerate._", "",
             f"- data: `{main['members'][0]['data']}`; models: {', '.join(f'`{m}`' for m in models)}; "
             f"seeds {seeds}; {len(main['members'])} members"
             + (f", {len(main['failed'])} failed" if main["failed"] else ""),
             f"- epochs: {sorted({m['epochs'] for m in main['members']})}; noise targets (weight/activation "
             f"bits): {', '.join(targets_bits)}",
             f"- hardware: {'; '.join(hw)}", ""]
    if selected:
        keys = list(selected["values"])
        lines += ["### Noise multiplier search (validation split carved from the training set)", "",
                  f"Rule: {selected['rule']}. Chosen: "
                  + ", ".join(f"`{k}={v}`" for k, v in selected["values"].items()) + ".", "",
                  _md_table(selected["table"], [("label", "method"), *((k, k) for k in keys),
                                                ("val_fp_accuracy", "val FP acc"),
                                                ("reference_fp_accuracy", "reference FP acc"),
                                                *((c, c.replace("_", " ")) for c in selected["table"][0]
                                                  if c.startswith("val_W")),
                                                ("eligible", "eligible"), ("chosen", "chosen")]), ""]
    for model in models:
        rows = [r for r in summary if r["model"] == model]
        present_bits = [b for b in bits if any(f"{b}_minmax_accuracy" in r for r in rows)]
        lines += [f"### `{model}`: test accuracy (%), min-max observer, attention matmuls quantized", "",
                  _pm_table(rows, [("fp_accuracy", "FP32"), *((f"{b}_minmax_accuracy", b) for b in present_bits)]),
                  "", f"### `{model}`: accuracy drop vs FP (points)", "",
                  _pm_table(rows, [(f"{b}_minmax_drop", b) for b in present_bits]), ""]
        others = sorted({k.split("_")[1] for r in rows for k in r if re.match(r"W\d+A\d+_[a-z]+_accuracy$", k)}
                        - {"minmax"})
        for obs in others:
            lines += [f"### `{model}`: accuracy with the `{obs}` observer", "",
                      _pm_table(rows, [(f"{b}_{obs}_accuracy", b) for b in present_bits]), ""]
        if any("W4A4_minmax_noattn_accuracy" in r for r in rows):
            lines += [f"### `{model}`: attention matmuls left in floating point (min-max)", "",
                      _pm_table(rows, [(f"{b}_minmax_noattn_accuracy", b) for b in present_bits]), ""]
        lines += [f"### `{model}`: curvature (on {main['flatness'][0]['n_hessian'] if main['flatness'] else '?'} "
                  "training images) and predicted vs measured weight-quantization loss increase", "",
                  _pm_table(rows, [("trace", "trace"), ("top_eigenvalue", "top eig"),
                                   ("sigma_trace_w4", "σ-trace W4"),
                                   ("predicted_increase_w4", "pred W4"), ("measured_increase_w4", "meas W4"),
                                   ("predicted_increase_w3", "pred W3"), ("measured_increase_w3", "meas W3")],
                            digits=None), "",
                  f"### `{model}`: cost", "",
                  _pm_table(rows, [("epoch_time_s", "s / epoch"), ("time_vs_plain", "x plain"),
                                   ("time_vs_sam", "x SAM")]), ""]
        effects = paired_effects(main, model)
        if effects:
            lines += [f"### `{model}`: paired differences to `plain` (same seed; min-max, 95 % t interval)", "",
                      _md_table([effect_cells(e) for e in effects],
                                [("config", "setting"), ("arm", "method"), ("n_pairs", "seeds"), ("diff", "difference"),
                                 ("ci", "95 % interval"), ("verdict", "verdict")]), ""]
        lines += [f"Figures: {link(f'accuracy_vs_bits_{model}')}, {link(f'trace_vs_drop_{model}')}, "
                  f"{link(f'predicted_vs_measured_{model}')}.", ""]
    lines += ["### Which curvature measure ranks the damage? (Spearman over members)", "",
              _md_table(rho, [("model", "model"), ("damage", "damage"), ("members", "n"),
                              ("top_eigenvalue", "top eig"), ("trace", "trace"), ("sigma_trace_w4", "σ-trace W4"),
                              ("predicted_increase_w4", "pred W4"), ("predicted_increase_w3", "pred W3"),
                              ("sharpness_ascent", "sharpness")]), ""]
    if main["failed"]:
        lines += ["### Failed members", "", _md_table(main["failed"], [("job", "job"), ("error", "error")]), ""]
    lines.append(END)
    block = "\n".join(lines)
    atomic_write_text(dest / "results.md", "# Study results\n\n" + block + "\n")
    paths = {"dest": dest, "results_md": dest / "results.md"}
    if md is not None:
        md = Path(md)
        text = md.read_text(encoding="utf-8") if md.is_file() else "# Results\n\n" + BEGIN + "\n" + END + "\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            text = head + block + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        atomic_write_text(md, text)
        paths["md"] = md
    return paths


# ---------------------------------------------------------------------------------------
# command line


def add_study_parser(sub: Any, add_json: Any) -> None:
    """``workbench study run|report``."""
    p = sub.add_parser("study", help="the reproduction study: search, seeded sweep, report (docs/study/*.yaml)")
    ssub = p.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run", help="run a study file: noise search, main sweep, report")
    r.add_argument("study_file")
    r.add_argument("--out", required=True, help="output folder (must be new or empty)")
    r.add_argument("--jobs", type=int, default=1, help="members executed at a time")
    r.add_argument("--dest", help="where the report's tables and figures go (default OUT/report)")
    r.add_argument("--md", help="Markdown file whose study block is replaced (e.g. docs/results.md)")
    r.add_argument("--engine", default="local", choices=("local", "dask"),
                   help="where members run: this machine's process pool or a Dask cluster (see docs/scaling.md)")
    r.add_argument("--address", default=None, metavar="tcp://HOST:PORT", help="scheduler of a running Dask cluster")
    r.add_argument("--retries", type=int, default=1, help="dask: reruns of a member whose worker died")
    r.add_argument("--search-from", metavar="STUDY_DIR",
                   help="reuse the finished noise search of an earlier study folder instead of searching again")
    r.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    r.add_argument("--no-progress", action="store_true")
    add_json(r)
    a = ssub.add_parser("ptq", help="quantize a finished study's members with more settings (no retraining)")
    a.add_argument("folder")
    a.add_argument("--observers", default="mse", help="comma-separated observers (default mse)")
    a.add_argument("--bits", default=",".join(DEFAULT_BITS), help="comma-separated WbAb settings")
    a.add_argument("--no-attn", action="store_true", help="also leave the attention matmuls in float")
    a.add_argument("--jobs", type=int, default=1)
    a.add_argument("--tag", default=None, help="name of the added tables (default: the observers)")
    add_json(a)
    f = ssub.add_parser("finetune", help="the fine-tune protocol: trained parents, paired arms, PTQ settings, "
                                         "intervals (docs/study/finetune/*.yaml); resumable")
    f.add_argument("protocol", help="protocol file (YAML), e.g. docs/study/finetune/quick.yaml")
    f.add_argument("--out", required=True, help="protocol folder: finished members in it are kept, the rest run")
    f.add_argument("--jobs", type=int, default=1, help="members at a time (one CPU thread each)")
    f.add_argument("--dest", help="where the report's tables and figures go (default OUT/report)")
    f.add_argument("--md", help="Markdown file whose finetune block is replaced (e.g. docs/results.md)")
    f.add_argument("--report-only", action="store_true", help="only rewrite the report from OUT's members")
    f.add_argument("--no-progress", action="store_true")
    add_json(f)
    q = ssub.add_parser("report", help="(re)write a study folder's tables, figures and Markdown")
    q.add_argument("folder")
    q.add_argument("--dest")
    q.add_argument("--md")
    add_json(q)


def run_study_command(args: Any) -> int:
    """``workbench study``: exit 8 if any member failed (the report still lists it)."""
    import json

    if args.study_command == "run":
        res = run_study(args.study_file, args.out, jobs=args.jobs, dest=args.dest, md=args.md,
                        search_from=args.search_from, html=not args.no_html, progress=not args.no_progress,
                        engine=args.engine, address=args.address, retries=args.retries)
        failed = len(res["main"]["failed"]) + len((res.get("search") or {}).get("failed", []))
        if args.json:
            print(json.dumps({"out": res["out"], "selected": res["selected"], "report": res["report"],
                              "failed": failed}, indent=2, default=str))
        else:
            print(f"study: {len(res['main']['jobs'])} members in {res['main']['seconds']:.0f} s -> {res['out']}")
            if res["selected"]:
                print(f"selected on the validation split: {res['selected']}")
            print(f"report: {res['report']['results_md']}")
        return 8 if failed else 0
    if args.study_command == "finetune":
        return _finetune_command(args)
    if args.study_command == "ptq":
        rows = add_ptq(args.folder, bits=args.bits.split(","), observers=args.observers.split(","),
                       attention=[True, False] if args.no_attn else [True], jobs=args.jobs, tag=args.tag)
        print(json.dumps(rows, indent=2) if args.json else f"added PTQ settings to {len(rows)} members; "
              f"rewrite the report with `workbench study report {args.folder}`")
        return 0
    paths = write_report(args.folder, dest=args.dest, md=args.md)
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    else:
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _finetune_command(args: Any) -> int:
    """``workbench study finetune``: exit 8 if a member failed (the report lists it)."""
    import json

    from .batch.finetune_report import write_report
    from .batch.finetune_study import run_protocol
    from .batch.protocol import Protocol

    protocol = Protocol.from_file(args.protocol)
    failed: list = []
    if not args.report_only:
        res = run_protocol(protocol, args.out, jobs=args.jobs, progress=not args.no_progress)
        failed = res["failed"]
        if res["search"].get("chosen"):
            print(f"search (validation split): {res['search']['chosen']}")
    paths = write_report(args.out, dest=args.dest, md=args.md)
    if args.json:
        print(json.dumps({"out": str(args.out), "failed": failed, **{k: str(v) for k, v in paths.items()}},
                         indent=2, default=str))
    else:
        print(f"report: {paths['report']}" + (f" ({len(failed)} member(s) failed)" if failed else ""))
    return 8 if failed else 0
