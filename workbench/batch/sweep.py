"""``run_sweep``: one notebook over a parameter grid, on this machine N at a time (processes) or
on a Dask cluster.

A sweep folder (``workbench sweep GRID.yaml --out DIR``) has ``sweep.json`` and ``summary.json``
at the top and one ``jobs/NNN/`` folder per grid point (``executed/`` and ``results/`` inside).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..nbparams import absolute_paths, check_notebook
from ..runinfo import prepare_run_dir, run_metadata, write_json
from .dask_engine import dask_client, dask_rows, threads_by_host
from .execute import notebook_parameters, resolve_notebook
from .report import make_report
from .sweep_job import failed_row, run_job

log = logging.getLogger(__name__)

def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a sweep file: ``notebook`` (name or path), ``parameters`` (base values), ``grid``
    (name -> list of values; the cartesian product is run) and ``include`` (extra points, each a
    mapping, crossed with the grid keys it does not set; e.g. one more method over every seed).

    Raises:
        ConfigError: missing/invalid keys, or a grid entry that is not a non-empty list.
    """
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read sweep file {path}: {e}") from e
    if not isinstance(spec, dict) or "notebook" not in spec:
        raise ConfigError(f"{path}: a sweep file needs 'notebook', optional 'parameters' and 'grid'")
    unknown = sorted(set(spec) - {"notebook", "parameters", "grid", "include", "description"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; use notebook, parameters, grid, include, description")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map parameter names to non-empty lists")
    base = spec.get("parameters") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: 'parameters' must be a mapping")
    include = spec.get("include") or []
    if not isinstance(include, list) or not all(isinstance(p, dict) and p for p in include):
        raise ConfigError(f"{path}: 'include' must be a list of non-empty mappings (extra grid points)")
    nb = str(spec["notebook"])
    if not Path(nb).is_absolute() and (path.parent / nb).is_file():
        nb = str(path.parent / nb)  # relative to the sweep file first
    return {"notebook": nb, "parameters": base, "grid": grid, "include": include,
            "description": spec.get("description", "")}


def grid_points(grid: Mapping[str, Sequence[Any]],
                include: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The cartesian product of a grid, in a stable order (first key varies slowest), then each
    ``include`` point crossed with the grid keys it does not set (its own values win)."""
    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    for extra in include:
        rest = [k for k in keys if k not in extra]
        for vals in itertools.product(*(grid[k] for k in rest)):
            point = {k: v for k, v in zip(rest, vals)}
            point.update(extra)
            # keep the grid's key order, then the include's own keys
            points.append({**{k: point[k] for k in keys if k in point}, **point})
    return points


#: Where sweep members run: ``local`` (a process pool on this machine) or ``dask`` (a Dask cluster).
SWEEP_ENGINES = ("local", "dask")


def local_rows(tasks: Sequence[dict[str, Any]], jobs: int,
                executor_factory: Callable[[int], Any] | None) -> Iterable[dict[str, Any]]:
    """Summary rows as members finish on this machine: in this process (one job) or a process pool."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    if jobs == 1 and executor_factory is None:
        for t in tasks:
            yield run_job(t)
        return
    factory = executor_factory or (lambda n: ProcessPoolExecutor(n, mp_context=get_context("spawn")))
    with factory(jobs) as pool:
        futures = {pool.submit(run_job, t): t for t in tasks}
        for fut in as_completed(futures):
            t = futures[fut]
            try:
                row = fut.result()
            except Exception as e:  # the worker itself died: still one failed row
                row = failed_row(t, e, f"job {t['job']} crashed: {e}")
            yield row




def run_sweep(grid_file: str | Path, out: str | Path, *, jobs: int = 1, html: bool = True,
              progress: bool = True, report: bool = True,
              executor_factory: Callable[[int], Any] | None = None, engine: str = "local",
              address: str | None = None, retries: int = 1) -> dict[str, Any]:
    """Run a notebook over a parameter grid, on this machine ``jobs`` at a time (processes) or on a
    Dask cluster (``engine="dask"``).

    A failing job does not stop the others; the summary lists each failure with its cell, and
    ``summary.json`` is rewritten (atomically) as each job finishes.

    Args:
        jobs: local: processes at a time; dask without ``address``: workers of the LocalCluster
            started for the sweep (one thread each). Each job gets ``cores // concurrent jobs``
            OMP/MKL threads.
        engine: ``local`` or ``dask``.
        address: the scheduler of a running Dask cluster (``tcp://host:8786``); its workers must see
            the notebook and ``out`` at the same paths (a shared filesystem).
        retries: dask: how often a job whose worker died (or that raised outside its notebook) is
            run again before it is recorded as failed.

    Returns:
        ``{"out", "jobs": [rows], "failed": [rows], "seconds"}``; each row has ``job``, ``point``
        (the grid values), ``status``, ``seconds`` and, on failure, ``cell``/``exec_count``/``error_*``
        (dask rows also ``attempts``).

    Raises:
        ConfigError: bad sweep file, unknown notebook, parameter or engine, ``jobs < 1``,
            ``retries < 0``, an address without the dask engine, or no scheduler at ``address``.
        RunDirError: ``out`` exists and is not empty.
    """
    from tqdm.auto import tqdm

    jobs, retries = int(jobs), int(retries)
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    if engine not in SWEEP_ENGINES:
        raise ConfigError(f"unknown sweep engine {engine!r}; use one of {', '.join(SWEEP_ENGINES)}")
    if address and engine != "dask":
        raise ConfigError("an address is a Dask scheduler's: use it with engine 'dask' (--engine dask)")
    if retries < 0:
        raise ConfigError(f"retries must be >= 0, got {retries}")
    spec = load_grid(grid_file)
    nb = resolve_notebook(spec["notebook"]).resolve()
    declared = notebook_parameters(nb)
    points = grid_points(spec["grid"], spec["include"])
    unknown = sorted((set(spec["parameters"]) | set(spec["grid"]) | {k for p in spec["include"] for k in p})
                     - set(declared))
    if unknown:
        raise ConfigError(f"{nb.name} has no parameter(s) {unknown}; valid: {', '.join(declared)}")
    base = absolute_paths(spec["parameters"])
    points = [absolute_paths(p) for p in points]
    for point in points:
        check_notebook(nb.stem, declared, {**base, **point})
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(dask_client(address, jobs)) if engine == "dask" else None
        where: dict[str, Any] = {"engine": engine, "jobs": jobs}
        if client is not None:
            by_host = threads_by_host(client)
            where.update(address=client.scheduler.address, retries=retries, threads_by_host=by_host)
            if address and not by_host:
                log.warning("no Dask worker is connected to %s yet: the jobs wait until workers join", address)
            elif address and jobs != 1:
                log.info("--jobs is unused with --address: the cluster's worker threads set how many run at a time")
        out = prepare_run_dir(out).resolve()  # only now, with the cluster reached; absolute for its workers
        write_json(out / "sweep.json", {**run_metadata(dict(spec["parameters"])), "kind": "sweep",
                                        "notebook": nb.stem, "grid": spec["grid"], "points": points,
                                        "description": spec["description"], **where})
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 and client is None else None
        tasks = []
        for i, point in enumerate(points):
            folder = out / "jobs" / f"{i:03d}"
            params = {**base, **point, "out_dir": str(folder / "results")}
            tasks.append({"job": folder.name, "point": point, "notebook": str(nb), "parameters": params,
                          "html": html, "folder": str(folder), "executed": str(folder / "executed" / nb.name),
                          "threads": threads, "engine": engine,
                          "threads_by_host": where.get("threads_by_host")})
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        bar = tqdm(total=len(tasks), desc=f"sweep {nb.stem}", unit="job", disable=not progress)
        finished = (dask_rows(client, tasks, retries) if client is not None
                    else local_rows(tasks, jobs, executor_factory))
        for row in finished:
            rows.append(row)
            bar.update(1)
            write_json(out / "summary.json", sorted(rows, key=lambda r: r["job"]))
        bar.close()
        seconds = time.perf_counter() - t0  # the jobs alone: without starting and stopping a cluster
    rows.sort(key=lambda r: r["job"])
    result = {"out": str(out), "jobs": rows, "failed": [r for r in rows if r["status"] != "ok"],
              "seconds": seconds}
    if report:
        result["report"] = {k: str(v) for k, v in make_report(out).items()}
    return result
