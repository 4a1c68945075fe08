"""The from-scratch reproduction study: does pre-conditioning make low-bit PTQ survive? Measured,
with seeds.

A study is two sweeps of the member notebook (``notebooks/06_study_member.ipynb``: train one
model with one method and seed, quantize it at every bit setting, measure its flatness):

1. ``search`` (optional): candidate noise multipliers trained on the training split minus a
   held-out validation split and judged there (never on the test split). The chosen value is
   the one with the best quantized validation accuracy among candidates whose full-precision
   validation accuracy stays within ``max_fp_loss`` points of the reference (``plain``) run.
2. the main sweep (``parameters``, ``grid``, ``include`` exactly as in a sweep file), with the
   chosen values filled into ``parameters``.

Then :func:`workbench.batch.scratch_report.write_report` turns the two sweep folders into tidy
CSVs, plotly figures and a Markdown report (mean ± std over seeds), optionally spliced into
``docs/results.md`` between ``<!-- study:begin -->`` and ``<!-- study:end -->``.

    workbench study run docs/study/cpu.yaml --out runs/study-cpu --jobs 2 \\
        --dest docs/results/study-cpu --md docs/results.md
    workbench study report runs/study-cpu --dest docs/results/study-cpu --md docs/results.md
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunDirError
from ..quant import parse_bits_pair
from ..runinfo import atomic_write_text, prepare_run_dir, run_metadata, write_json
from .scratch_member import MEMBER_NOTEBOOK, member_data, member_ptq, ptq_grid

log = logging.getLogger(__name__)

#: The PTQ settings of the protocol (W2A4 shows whether anything survives 2-bit weights).
DEFAULT_BITS = ("W8A8", "W6A6", "W4A8", "W4A4", "W3A3", "W2A4")
_STUDY_KEYS = {"description", "notebook", "parameters", "grid", "include", "search"}
_SEARCH_KEYS = {"parameters", "grid", "include", "select"}

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
        parse_bits_pair(select["config"])
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
    sweep with more seeds. ``sweep_kwargs`` go to :func:`workbench.batch.sweep.run_sweep` (e.g. ``engine``, ``html``).

    Returns:
        ``{"out", "selected", "search", "main", "report"}``.

    Raises:
        ConfigError: a bad study file; RunDirError: ``out`` is not new or empty.
    """
    from .execute import resolve_notebook
    from .sweep import run_sweep

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
    from .scratch_report import write_report  # the report reads this module's tables

    result["report"] = {k: str(v) for k, v in write_report(out, dest=dest, md=md).items()}
    return result


def _extra_ptq_job(args: dict[str, Any]) -> dict[str, Any]:
    """One member's added PTQ settings (top-level so it pickles for the process pool)."""
    import json

    import torch

    from ..checkpoint import load_model

    torch.set_num_threads(int(args["threads"]))
    res = Path(args["results"])
    p = json.loads((res / "run.json").read_text(encoding="utf-8"))["params"]
    member = read_rows(res / "member.json")[0]
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


def read_rows(path: Path) -> list[dict[str, Any]]:
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
    status = {r.get("job"): r for r in read_rows(folder / "summary.json")}
    out: dict[str, list[dict[str, Any]]] = {"members": [], "ptq": [], "flatness": [], "failed": []}
    meta = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    points = meta.get("points") or []
    for job_dir in sorted(p for p in (folder / "jobs").glob("*") if p.is_dir()):
        job = job_dir.name
        res = job_dir / "results"
        members = read_rows(res / "member.json")
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
            out["ptq"] += [{**key, **r} for r in read_rows(f) if f.name == "ptq.json" or r["config"] != "FP32"]
        out["flatness"] += [{**key, **r, "label": m["label"]} for r in read_rows(res / "flatness.json")]
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
