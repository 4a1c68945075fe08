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
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunDirError
from ..quant import parse_bits_pair
from ..runinfo import atomic_write_text, prepare_run_dir, run_metadata, write_json
from .scratch_collect import read_rows, select_search
from .scratch_member import DEFAULT_BITS, MEMBER_NOTEBOOK, member_ptq
from .scratch_report import write_report

log = logging.getLogger(__name__)

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
    result["report"] = {k: str(v) for k, v in write_report(out, dest=dest, md=md).items()}
    return result


def _extra_ptq_job(args: dict[str, Any]) -> dict[str, Any]:
    """One member's added PTQ settings (top-level so it pickles for the process pool)."""
    import json

    import torch

    from ..checkpoint import load_model
    from ..nbtools import load_data
    from ..ptq import configs_from_bits

    torch.set_num_threads(int(args["threads"]))
    res = Path(args["results"])
    p = json.loads((res / "run.json").read_text(encoding="utf-8"))["params"]
    member = read_rows(res / "member.json")[0]
    model, _ = load_model(res / "checkpoints" / member["label"] / "model.pt")
    bundle = load_data(p["data"], seed=p["seed"], val_size=p.get("val_size", 0), limit_train=p["limit_train"],
                       limit_test=p["limit_test"], n_calib=p["n_calib"])
    configs = configs_from_bits(args["bits"], observers=args["observers"], attention=args["attention"],
                                n_calib=p["n_calib"])
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

    from ..ptq import configs_from_bits

    configs_from_bits(list(bits), observers=observers, attention=attention)  # check the settings before any work
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
