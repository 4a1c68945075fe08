"""Batch execution of the notebooks: ``run_notebooks`` (the whole set, in order), ``run_sweep``
(one notebook over a parameter grid, N at a time) and ``make_report`` (one CSV and one HTML
page from a run or a sweep).

Layout of a run folder (``workbench run --out DIR``)::

    DIR/run.json                  parameters, profile, versions, git commit
    DIR/summary.json              one row per notebook: status, seconds, failing cell
    DIR/executed/NB.ipynb, .html  the executed notebooks and their HTML export
    DIR/results/NB/               what each notebook wrote (tables, figures, checkpoints)
    DIR/report.csv, report.html   made by make_report at the end

A sweep folder (``workbench sweep GRID.yaml --out DIR``) has ``sweep.json`` and ``summary.json``
at the top and one ``jobs/NNN/`` folder per grid point (``executed/`` and ``results/`` inside).

Kernels always run the Python interpreter running the workbench (not whichever ``python3``
kernelspec happens to be installed), so a fresh clone's ``.venv`` is what executes notebooks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .bundled import bundled_dir
from .errors import ConfigError, NotebookError, RunDirError
from .nbparams import absolute_paths, check_notebook, literal_defaults
from .runinfo import prepare_run_dir, run_metadata, write_csv, write_json

log = logging.getLogger(__name__)

#: The repository's notebooks folder (the default notebook set).
NOTEBOOK_DIR = bundled_dir("notebooks")
#: Notebooks that take ``ckpt_dir`` reuse the checkpoints 00_quickstart trained in the same run.
CHECKPOINT_SOURCE = "00_quickstart"
#: The notebook that aggregates a run (it gets ``results_dir``).
REPORT_NOTEBOOK = "07_report"


# ---------------------------------------------------------------------------------------
# kernels


def _current_env_kernel_manager() -> type:
    """A jupyter KernelManager class whose every kernelspec is this interpreter's ipykernel."""
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    class CurrentEnvSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str):  # noqa: ARG002 - one spec for every name
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                          **ipykernel.kernelspec.get_kernel_dict())

    class CurrentEnvKernelManager(KernelManager):
        def _kernel_spec_manager_default(self) -> KernelSpecManager:
            return CurrentEnvSpecs(data_dir=self.data_dir)

    return CurrentEnvKernelManager


# ---------------------------------------------------------------------------------------
# notebooks and parameters


def list_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The notebooks of a folder in run order (by name: ``00_...``, ``01_...``)."""
    folder = Path(folder) if folder is not None else NOTEBOOK_DIR
    nbs = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if not nbs:
        raise ConfigError(f"no notebooks (*.ipynb) in {folder}")
    return nbs


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """Names and default values (as source text) of a notebook's ``parameters`` cell.

    Raises:
        ConfigError: the notebook has no cell tagged ``parameters``.
    """
    import papermill

    pm_log = logging.getLogger("papermill")
    level = pm_log.level
    pm_log.setLevel(max(level, logging.WARNING))  # inspection logs every notebook it opens at INFO
    try:
        found = papermill.inspect_notebook(str(path))
    finally:
        pm_log.setLevel(level)
    if not found:
        raise ConfigError(f"{Path(path).name} has no cell tagged 'parameters'")
    return {k: v.get("default") for k, v in found.items()}


def resolve_notebook(name: str | Path, folder: str | Path | None = None) -> Path:
    """A notebook path from a path, a file name or a stem (``02_ptq``).

    Raises:
        ConfigError: no such notebook (the message lists the available ones).
    """
    p = Path(name)
    if p.suffix == ".ipynb" and p.is_file():
        return p.resolve()  # papermill runs it in its own folder: the path must not depend on ours
    cands = {q.stem: q for q in list_notebooks(folder)}
    stem = p.stem if p.suffix == ".ipynb" else str(name)
    if stem in cands:
        return cands[stem]
    raise ConfigError(f"unknown notebook {str(name)!r}; available: {', '.join(cands)}")


def _params_for(params: Mapping[str, Any], declared: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` a notebook declares (papermill would warn about the rest)."""
    return {k: v for k, v in params.items() if k in declared}


def profile_params(profile: str) -> dict[str, Any]:
    """The parameters a profile passes (``quick``: none, the notebooks' defaults are the quick profile)."""
    from .nbtools import PROFILES

    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    return dict(PROFILES[profile])


# ---------------------------------------------------------------------------------------
# executing one notebook


def _error_from(exc: Exception, notebook: str) -> NotebookError:
    """Map papermill's execution error onto :class:`NotebookError` (cell index, name, value)."""
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    count = getattr(exc, "exec_count", None)
    cell = getattr(exc, "cell_index", None)
    where = f"cell [{count}]" if count is not None else (f"cell #{cell}" if cell is not None else "a cell")
    err = NotebookError(f"{notebook}: {where} raised {ename}: {evalue}", notebook=notebook, cell_index=cell,
                        error_name=ename, error_value=str(evalue))
    err.exec_count = count  # type: ignore[attr-defined]
    return err


def export_html(executed: str | Path) -> Path:
    """Export an executed notebook to HTML next to it (nbconvert's lab template)."""
    import nbformat
    from nbconvert import HTMLExporter

    from .runinfo import atomic_write_text

    executed = Path(executed)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    out = executed.with_suffix(".html")
    atomic_write_text(out, body)
    return out


def execute_notebook(notebook: str | Path, executed: str | Path, parameters: Mapping[str, Any] | None = None, *,
                     html: bool = True, cwd: str | Path | None = None, progress: bool = False,
                     timeout: float | None = None, log_output: bool = False,
                     raise_errors: bool = False) -> dict[str, Any]:
    """Execute one notebook with papermill (current interpreter's kernel), export HTML.

    Returns:
        A summary row: ``notebook, status ('ok'|'failed'), seconds, executed, html`` plus, on failure,
        ``cell, exec_count, error_name, error_value, message`` (the executed notebook is kept either way).

    Raises:
        NotebookError: with ``raise_errors``, when a cell fails (carries the cell and the error).
    """
    import papermill

    notebook, executed = Path(notebook), Path(executed)
    executed.parent.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"notebook": notebook.stem, "status": "ok", "executed": str(executed)}
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=dict(parameters or {}), progress_bar=progress,
            cwd=str(cwd) if cwd is not None else None, kernel_name="python3", log_output=log_output,
            execution_timeout=timeout, kernel_manager_class=_current_env_kernel_manager())
    except papermill.PapermillExecutionError as e:
        err = _error_from(e, notebook.stem)
        row.update(status="failed", cell=err.cell_index, exec_count=getattr(err, "exec_count", None),
                   error_name=err.error_name, error_value=err.error_value, message=str(err))
    except Exception as e:  # kernel died, timeout, bad parameters: still one failed row, not a crash
        err = _error_from(e, notebook.stem)
        row.update(status="failed", cell=None, exec_count=None, error_name=err.error_name,
                   error_value=err.error_value, message=str(err))
    row["seconds"] = time.perf_counter() - t0
    if html and executed.is_file():
        try:
            row["html"] = str(export_html(executed))
        except Exception as e:  # an export problem must not hide the execution result
            log.warning("HTML export of %s failed: %s", executed.name, e)
    if raise_errors and row["status"] != "ok":
        raise NotebookError(row["message"], notebook=notebook.stem, cell_index=row["cell"],
                            error_name=row["error_name"], error_value=row["error_value"])
    return row


# ---------------------------------------------------------------------------------------
# workbench run


def run_notebooks(out: str | Path, *, profile: str = "quick", params: Mapping[str, Any] | None = None,
                  notebooks: Sequence[str | Path] | None = None, folder: str | Path | None = None,
                  html: bool = True, share_checkpoints: bool = True, stop_on_error: bool = False,
                  progress: bool = True, report: bool = True) -> dict[str, Any]:
    """Execute the notebooks in order into ``out`` (see the module docstring for the layout).

    Args:
        profile: ``quick`` (the notebooks' defaults) or ``full``.
        params: ``key=value`` overrides on top of the profile; each notebook gets the keys its
            ``parameters`` cell declares.
        notebooks: names or paths (default: every notebook in ``folder``, in order).
        share_checkpoints: notebooks with a ``ckpt_dir`` parameter reuse 00_quickstart's checkpoints.
        stop_on_error: stop at the first failing notebook (default: run the rest, report at the end).

    Returns:
        ``{"out": ..., "notebooks": [summary rows], "failed": [...], "seconds": ...}``.

    Raises:
        RunDirError: ``out`` exists and is not empty.
        ConfigError: unknown profile/notebook, or a parameter no notebook declares.
    """
    from tqdm.auto import tqdm

    paths = [resolve_notebook(n, folder) for n in notebooks] if notebooks else list_notebooks(folder)
    declared = {p.stem: notebook_parameters(p) for p in paths}
    # paths mean what they mean where the command was typed, not in notebooks/ where papermill runs
    given = absolute_paths({**profile_params(profile), **dict(params or {})})
    unknown = sorted(k for k in (params or {}) if not any(k in d for d in declared.values()))
    if unknown:
        valid = sorted(set().union(*declared.values()))
        raise ConfigError(f"no notebook has parameter(s) {unknown}; valid: {', '.join(valid)}")
    for nb in paths:  # the package's own checks on what each notebook will run with, before any starts
        check_notebook(nb.stem, declared[nb.stem], given)
    out = prepare_run_dir(Path(out).expanduser()).resolve()  # only now, with every name checked
    write_json(out / "run.json", {**run_metadata(dict(given)), "kind": "run", "profile": profile,
                                  "notebooks": [p.stem for p in paths]})
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = tqdm(paths, desc="notebooks", unit="nb", disable=not progress)
    for nb in bar:
        bar.set_postfix_str(nb.stem)
        p = _params_for(given, declared[nb.stem])
        p["out_dir"] = str(out / "results" / nb.stem)
        # 00 fine-tunes once per seed (seed<N>/checkpoints); the others run one seed, 0 by default
        seed = literal_defaults(declared[nb.stem]).get("seed", 0) if "seed" not in given else given["seed"]
        source = out / "results" / CHECKPOINT_SOURCE
        ckpt = next((c for c in (source / f"seed{seed}" / "checkpoints", source / "checkpoints") if c.is_dir()),
                    source / "checkpoints")
        if share_checkpoints and "ckpt_dir" in declared[nb.stem] and "ckpt_dir" not in given and ckpt.is_dir():
            p["ckpt_dir"] = str(ckpt)
        if "results_dir" in declared[nb.stem] and "results_dir" not in given:
            p["results_dir"] = str(out)
        row = execute_notebook(nb, out / "executed" / nb.name, p, html=html, cwd=nb.parent)
        rows.append(row)
        write_json(out / "summary.json", rows)
        if row["status"] != "ok":
            log.error("%s", row["message"])
            if stop_on_error:
                break
    bar.close()
    result = {"out": str(out), "notebooks": rows, "failed": [r for r in rows if r["status"] != "ok"],
              "seconds": time.perf_counter() - t0}
    if report:
        result["report"] = {k: str(v) for k, v in make_report(out).items()}
    return result


# ---------------------------------------------------------------------------------------
# workbench sweep


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
#: The thread-pool sizes a kernel reads at start-up (torch: OMP; NumPy's BLAS: MKL or OpenBLAS).
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _kernel_threads(threads: int | None) -> Iterator[None]:
    """Size the thread pools of the kernels started inside the block, then restore this process's.

    A kernel reads them from its environment at start-up, so N concurrent jobs share the cores instead
    of oversubscribing them (on Dask it also replaces the nanny's default of 1 thread, which would
    starve a lone member). Restoring matters: a one-job sweep runs ``_job`` in the caller's process, and
    a leaked ``OMP_NUM_THREADS=1`` would make every kernel started later single-threaded.
    """
    if not threads:
        yield
        return
    saved = {var: os.environ.get(var) for var in _THREAD_VARS}
    os.environ.update({var: str(threads) for var in _THREAD_VARS})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _job(args: dict[str, Any]) -> dict[str, Any]:
    """One sweep member, in a local worker process or on a Dask worker (top-level so it pickles).

    Every path in ``args`` is absolute and the member writes only into its own ``jobs/NNN`` folder.
    It first clears that folder's ``executed/`` and ``results/``: they hold something only when an
    earlier attempt of this member was cut off (its worker died), never a finished result.

    Raises:
        ConfigError: the notebook is not visible here (cluster workers without the shared filesystem).
    """
    import shutil
    import socket

    threads = args.get("threads")
    if not threads and args.get("engine") == "dask":
        threads = _dask_threads(args.get("threads_by_host") or {})
    notebook, folder = Path(args["notebook"]), Path(args["folder"])
    if not notebook.is_file():
        raise ConfigError(f"{notebook} is not visible on {socket.gethostname()}: cluster workers need the "
                          "notebooks and the sweep folder on a shared filesystem, at the same paths")
    for sub in ("executed", "results"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    with _kernel_threads(threads):
        row = execute_notebook(notebook, args["executed"], args["parameters"], html=args["html"],
                               cwd=notebook.parent)
    return {**row, "job": args["job"], "point": args["point"], "host": socket.gethostname(), "threads": threads}


def _failed_row(task: Mapping[str, Any], exc: BaseException, message: str, **extra: Any) -> dict[str, Any]:
    """The summary row of a member that never produced one itself (its process or worker died)."""
    return {"job": task["job"], "point": task["point"], "notebook": Path(task["notebook"]).stem,
            "status": "failed", "error_name": type(exc).__name__, "error_value": str(exc), "cell": None,
            "exec_count": None, "message": message, **extra}


def _local_rows(tasks: Sequence[dict[str, Any]], jobs: int,
                executor_factory: Callable[[int], Any] | None) -> Iterable[dict[str, Any]]:
    """Summary rows as members finish on this machine: in this process (one job) or a process pool."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    if jobs == 1 and executor_factory is None:
        for t in tasks:
            yield _job(t)
        return
    factory = executor_factory or (lambda n: ProcessPoolExecutor(n, mp_context=get_context("spawn")))
    with factory(jobs) as pool:
        futures = {pool.submit(_job, t): t for t in tasks}
        for fut in as_completed(futures):
            t = futures[fut]
            try:
                row = fut.result()
            except Exception as e:  # the worker itself died: still one failed row
                row = _failed_row(t, e, f"job {t['job']} crashed: {e}")
            yield row


# -- the Dask engine


def _worker_facts(dask_worker: Any) -> dict[str, Any]:
    """Run on every Dask worker (``Client.run``): its host, cores and task slots."""
    from distributed.comm import get_address_host

    return {"host": get_address_host(dask_worker.address), "cpus": os.cpu_count() or 1,
            "nthreads": dask_worker.state.nthreads}


def _threads_by_host(client: Any) -> dict[str, int]:
    """Threads per member on each host: its cores over the task slots of all its workers together
    (two 1-thread workers on a 16-core machine: 8 threads each).

    Raises:
        ConfigError: the workers cannot import the workbench (it must be installed on every worker).
    """
    try:
        facts = client.run(_worker_facts)
    except Exception as e:
        if _is_import_error(e):
            raise ConfigError(f"the Dask workers cannot import the workbench ({e}); install it on every "
                              "worker, in the environment that runs `dask worker`") from e
        # a worker leaving right now: each member then sizes itself on its worker
        log.warning("could not ask the Dask workers for their cores: %s", e)
        return {}
    hosts: dict[str, dict[str, int]] = {}
    for f in facts.values():
        h = hosts.setdefault(f["host"], {"cpus": f["cpus"], "slots": 0})
        h["slots"] += f["nthreads"]
    return {host: max(1, h["cpus"] // max(1, h["slots"])) for host, h in hosts.items()}


def _is_import_error(exc: BaseException) -> bool:
    """A worker could not unpickle our function: Dask reports that as a plain ``Exception`` whose
    text names the ``ModuleNotFoundError``."""
    return isinstance(exc, ImportError) or "ModuleNotFoundError" in str(exc) or "ImportError" in str(exc)


def _dask_threads(by_host: Mapping[str, int]) -> int:
    """Threads for the member this Dask worker runs: its host's share from ``by_host`` (measured when
    the sweep started), else, for a worker that joined later, the cores over this worker's slots."""
    try:
        from distributed import get_worker
        from distributed.comm import get_address_host

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return os.cpu_count() or 1
    host = get_address_host(worker.address)
    return by_host.get(host) or max(1, (os.cpu_count() or 1) // max(1, worker.state.nthreads))


def _quiet_dask_logs() -> None:
    """Run on each worker of the sweep's own LocalCluster as it shuts down."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _dask_client(address: str | None, workers: int) -> Iterator[Any]:
    """A ``distributed.Client`` connected to the scheduler at ``address``, or to a LocalCluster of
    ``workers`` processes with one thread each, started here and closed again on exit.

    Raises:
        MissingDependencyError: dask.distributed is not installed.
        ConfigError: no scheduler answers at ``address``.
    """
    from .errors import MissingDependencyError

    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise MissingDependencyError("the dask engine needs dask.distributed: pip install distributed") from e
    dlog = logging.getLogger("distributed")
    level = dlog.level
    dlog.setLevel(max(level, logging.WARNING))  # every connect, start and stop is logged at INFO
    try:
        if address:
            try:
                client = Client(address, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as e:
                raise ConfigError(f"no Dask scheduler answers at {address}: {e}") from e
            with client:
                yield client
            return
        # Our own cluster: the sweep's retries are the only retry count (no scheduler-side reruns), and
        # a worker holds just the job it runs, so a dying worker takes no queued job along with it.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                              "distributed.scheduler.worker-saturation": 1.0}):
            # no dashboard (bokeh is not a dependency), and its health page on a free port, not 8787
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                   silence_logs=logging.WARNING)
        with cluster, Client(cluster, set_as_default=False) as client:
            try:
                yield client
            finally:  # closing, workers' heartbeats race the scheduler's end and log tracebacks of nothing
                with contextlib.suppress(Exception):
                    client.run(_quiet_dask_logs)
                dlog.setLevel(logging.CRITICAL)
    finally:
        dlog.setLevel(level)


def _dask_rows(client: Any, tasks: Sequence[dict[str, Any]], retries: int) -> Iterable[dict[str, Any]]:
    """Summary rows as members finish on a Dask cluster. A member whose worker died (``KilledWorker``)
    or that raised outside its notebook is submitted again, up to ``retries`` times, then recorded as
    failed with the reason; the other members go on either way."""
    import uuid

    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from .errors import WorkbenchError

    sweep = uuid.uuid4().hex[:8]
    attempts: dict[str, int] = {}
    running: dict[str, tuple[Any, dict[str, Any]]] = {}  # future key -> (future, task)

    def submit(task: dict[str, Any]) -> Any:
        n = attempts[task["job"]] = attempts.get(task["job"], 0) + 1
        fut = client.submit(_job, task, key=f"workbench-sweep-{sweep}-{task['job']}-{n}", pure=False)
        running[fut.key] = (fut, task)
        return fut

    done = as_completed([submit(t) for t in tasks], loop=client.loop)
    try:
        for fut in done:
            _, task = running.pop(fut.key)
            job, n = task["job"], attempts[task["job"]]
            try:
                row = {**fut.result(), "attempts": n}
            except BaseException as e:  # a cancelled future raises CancelledError, a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                lost = isinstance(e, KilledWorker)
                why = "its Dask worker died while running it" if lost else f"{type(e).__name__}: {e}"
                if n <= retries and not isinstance(e, WorkbenchError) and not _is_import_error(e):
                    log.warning("job %s: %s; running it again (retry %d of %d)", job, why, n, retries)
                    done.add(submit(task))
                    continue
                hint = "; is the workbench installed on every worker?" if _is_import_error(e) else ""
                row = _failed_row(task, e, f"job {job} failed outside its notebook after {n} attempt(s) "
                                           f"(retries {retries}): {why}{hint}", attempts=n)
            finally:
                fut.release()
            yield row
    finally:
        if running:  # interrupted: nothing of this sweep keeps running on the cluster
            client.cancel([f for f, _ in running.values()])


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
        client = stack.enter_context(_dask_client(address, jobs)) if engine == "dask" else None
        where: dict[str, Any] = {"engine": engine, "jobs": jobs}
        if client is not None:
            by_host = _threads_by_host(client)
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
        finished = (_dask_rows(client, tasks, retries) if client is not None
                    else _local_rows(tasks, jobs, executor_factory))
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


# ---------------------------------------------------------------------------------------
# workbench report


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("skipping unreadable %s: %s", path, e)
        return None


def _tables(results: Path) -> dict[str, list[dict[str, Any]]]:
    """Every tidy table (``NAME.json`` holding a list of dicts) directly in a results folder."""
    out = {}
    for p in sorted(results.glob("*.json")):
        rows = _read_json(p)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            out[p.stem] = rows
    return out


def collect_results(folder: str | Path) -> dict[str, Any]:
    """Gather a run's or a sweep's results: kind, units (one per notebook or job) and summary rows.

    Each summary row is a notebook's ``summary`` table row with ``unit`` (notebook name or job id),
    ``notebook`` and, for sweeps, the grid values in front.

    Raises:
        RunDirError: the folder is neither a run nor a sweep.
    """
    folder = Path(folder)
    if (folder / "sweep.json").is_file():
        meta, kind = _read_json(folder / "sweep.json") or {}, "sweep"
        status = {r["job"]: r for r in (_read_json(folder / "summary.json") or [])}
        units = [(d.name, d / "results", status.get(d.name, {}),
                  (status.get(d.name) or {}).get("point") or _point_of(meta, d.name))
                 for d in sorted((folder / "jobs").glob("*")) if d.is_dir()]
        notebook = meta.get("notebook", "")
    elif (folder / "run.json").is_file() and (folder / "results").is_dir():
        meta, kind = _read_json(folder / "run.json") or {}, "run"
        status = {r["notebook"]: r for r in (_read_json(folder / "summary.json") or [])}
        units = [(d.name, d, status.get(d.name, {}), {}) for d in sorted((folder / "results").glob("*")) if d.is_dir()]
        notebook = None
    elif (folder / "run.json").is_file():  # one notebook's own output folder
        meta, kind = _read_json(folder / "run.json") or {}, "notebook"
        units = [(meta.get("notebook") or folder.name, folder, {}, {})]
        notebook = meta.get("notebook")
    elif any((d / "run.json").is_file() for d in folder.glob("*")):
        # a folder of notebook output folders (runs/notebooks): the latest one of each notebook
        latest: dict[str, Path] = {}
        for d in sorted(p for p in folder.glob("*") if (p / "run.json").is_file()):
            latest[(_read_json(d / "run.json") or {}).get("notebook") or d.name] = d
        meta, kind, notebook = {}, "folder", None
        units = [(name, d, {"status": "ok"}, {}) for name, d in sorted(latest.items())]
    else:
        raise RunDirError(f"{folder} holds no workbench run or sweep (no run.json or sweep.json)")
    rows: list[dict[str, Any]] = []
    unit_info = []
    for name, results, st, point in units:
        tables = _tables(results) if results.is_dir() else {}
        nb = notebook or name
        for r in tables.get("summary", []):
            rows.append({"unit": name, "notebook": nb, **point, **r})
        unit_info.append({"unit": name, "notebook": nb, "point": point, "status": st.get("status", "unknown"),
                          "seconds": st.get("seconds"), "error": st.get("message"), "html": st.get("html"),
                          "results": str(results), "tables": tables,
                          "figures": sorted(str(p) for p in (results / "figures").glob("*.html"))
                          if results.is_dir() else []})
    return {"kind": kind, "meta": meta, "units": unit_info, "rows": rows}


def _point_of(meta: dict[str, Any], job: str) -> dict[str, Any]:
    pts = meta.get("points") or []
    i = int(job) if job.isdigit() else -1
    return pts[i] if 0 <= i < len(pts) else {}


def _html_table(rows: Sequence[dict[str, Any]], limit: int = 200) -> str:
    from .nbtools import Table

    if not rows:
        return "<p><i>(no rows)</i></p>"
    more = f"<p><i>{len(rows) - limit} more rows in the CSV.</i></p>" if len(rows) > limit else ""
    return Table(rows[:limit])._repr_html_() + more


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right;font-size:90%}th{background:#f3f3f3}caption{text-align:left;font-weight:bold}"
        ".failed{color:#b00}")


def make_report(folder: str | Path, *, out: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Aggregate a run or a sweep into ``report.csv`` (every summary row, tidy) and ``report.html``
    (status of each notebook/job, the summary rows, each notebook's tables, links to figures and
    executed notebooks), written into ``out`` (default: ``folder``).

    Raises:
        RunDirError: not a run/sweep folder, or a report exists and ``overwrite`` is False.
    """
    import html as _h

    folder = Path(folder)
    res = collect_results(folder)
    dest = Path(out) if out is not None else folder
    csv_path, html_path = dest / "report.csv", dest / "report.html"
    if not overwrite and (csv_path.exists() or html_path.exists()):
        raise RunDirError(f"{folder} already has a report; pass overwrite=True (--overwrite) to replace it")
    write_csv(csv_path, res["rows"])

    def link(p: str | None, text: str) -> str:
        if not p:
            return ""
        rel = os.path.relpath(p, dest)
        return f'<a href="{_h.escape(rel)}">{_h.escape(text)}</a>'

    title = f"workbench {res['kind']} report: {folder.name}"
    status_rows = [{res["kind"] == "sweep" and "job" or "notebook": u["unit"], **u["point"],
                    "status": u["status"], "seconds": u["seconds"], "error": u["error"] or ""}
                   for u in res["units"]]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_h.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_h.escape(title)}</h1>"]
    git = (res["meta"].get("git") or {})
    parts.append(f"<p>made {time.strftime('%Y-%m-%d %H:%M')}; git commit {_h.escape(str(git.get('commit')))}"
                 f"{' (dirty)' if git.get('dirty') else ''}; profile {_h.escape(str(res['meta'].get('profile', '-')))}"
                 f"; {len(res['rows'])} summary rows in <a href='report.csv'>report.csv</a></p>")
    parts.append("<h2>Status</h2>" + _html_table(status_rows))
    parts.append("<h2>Summary</h2>" + _html_table(res["rows"]))
    for u in res["units"]:
        cls = " class='failed'" if u["status"] == "failed" else ""
        parts.append(f"<h2{cls}>{_h.escape(u['unit'])} ({_h.escape(u['status'])})</h2>")
        links = [link(u["html"], "executed notebook")] + [link(f, Path(f).stem) for f in u["figures"]]
        if any(links):
            parts.append("<p>" + " · ".join(x for x in links if x) + "</p>")
        for name, rows in u["tables"].items():
            if name != "summary":
                parts.append(f"<h3>{_h.escape(name)}</h3>" + _html_table(rows, limit=50))
    parts.append("</body></html>")
    from .runinfo import atomic_write_text

    atomic_write_text(html_path, "\n".join(parts))
    return {"csv": csv_path, "html": html_path}


def format_summary(rows: Iterable[dict[str, Any]]) -> str:
    """Fixed-width text of run/sweep rows for the terminal, failures with their cell."""
    lines = []
    for r in rows:
        name = r.get("job") and f"job {r['job']} {json.dumps(r.get('point', {}))}" or r.get("notebook", "?")
        secs = f"{r.get('seconds', 0) or 0:7.1f} s"
        if r.get("status") == "ok":
            lines.append(f"  ok      {secs}  {name}")
        else:
            where = f"cell [{r['exec_count']}]" if r.get("exec_count") is not None else "a cell"
            lines.append(f"  FAILED  {secs}  {name}: {where} raised {r.get('error_name')}: "
                         f"{_one_line(r.get('error_value'))}")
    return "\n".join(lines)


def _one_line(s: Any, n: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(s or "")).strip()
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------
# command line: parsers and runners for workbench.cli to register (this module never imports it)


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values read as YAML (``3``, ``0.5``, ``[plain, dnq]``, ``{depth: 4}``),
    ``None`` as null, anything else as a string. Hyphens in keys become underscores.

    Raises:
        ConfigError: an item without ``=``.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"-p expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        text = v.strip()
        if text in ("None", "null", "~"):
            val: Any = None
        else:
            try:
                val = yaml.safe_load(text)
            except yaml.YAMLError:
                val = v
            if val is None:  # an empty value is the empty string, not null
                val = v
        out[k.strip().replace("-", "_")] = val
    return out


def add_run_parser(sub: Any, add_json: Callable[[Any], None]) -> None:
    """``workbench run``."""
    p = sub.add_parser("run", help="execute the notebooks in order (papermill) into a new folder")
    p.add_argument("--profile", default="quick", choices=("quick", "full"),
                   help="quick: the notebooks' tiny CPU defaults; full: the real models and data")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="notebook parameter override, repeatable (e.g. -p epochs=5 -p 'methods=[plain,dnq]')")
    p.add_argument("--notebook", action="append", metavar="NAME", help="run only these notebooks (repeatable)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing notebook")
    p.add_argument("--no-progress", action="store_true")
    add_json(p)


def add_sweep_parser(sub: Any, add_json: Callable[[Any], None]) -> None:
    """``workbench sweep``."""
    p = sub.add_parser("sweep", help="run one notebook over a parameter grid (YAML), N at a time")
    p.add_argument("grid", help="YAML file: notebook, parameters, grid (see notebooks/sweeps/)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--jobs", type=int, default=1,
                   help="notebooks executed at a time: local processes, or the workers of the Dask "
                        "LocalCluster that --engine dask starts when no --address is given")
    p.add_argument("--engine", default="local", choices=SWEEP_ENGINES,
                   help="local: a process pool on this machine; dask: a Dask distributed cluster")
    p.add_argument("--address", default=None, metavar="tcp://HOST:PORT",
                   help="scheduler of a running Dask cluster (`dask scheduler`), with --engine dask; its "
                        "workers must see the notebooks and --out at the same paths")
    p.add_argument("--retries", type=int, default=1,
                   help="dask: run a job again up to N times when its worker dies (default 1)")
    p.add_argument("--no-html", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_json(p)


def add_report_parser(sub: Any, add_json: Callable[[Any], None]) -> None:
    """``workbench report``."""
    p = sub.add_parser("report", help="aggregate a run or sweep folder into report.csv and report.html")
    p.add_argument("folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    add_json(p)


def _finish(result: dict[str, Any], rows_key: str, as_json: bool, what: str) -> int:
    import sys

    rows = result[rows_key]
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"{what}: {len(rows) - len(result['failed'])} of {len(rows)} succeeded in "
              f"{result['seconds']:.0f} s -> {result['out']}")
        print(format_summary(rows))
        if result.get("report"):
            print(f"report: {result['report']['html']}")
    if result["failed"]:
        print(f"{len(result['failed'])} failed; the executed notebooks show the failing cells", file=sys.stderr)
        return 8  # the CLI's exit code for NotebookError
    return 0


def run_run_command(args: Any) -> int:
    """``workbench run``: execute the notebook set, print a summary; exit 8 if any notebook failed."""
    result = run_notebooks(args.out, profile=args.profile, params=parse_params(args.param),
                           notebooks=args.notebook, html=not args.no_html, stop_on_error=args.stop_on_error,
                           progress=not args.no_progress)
    return _finish(result, "notebooks", args.json, "notebooks")


def run_sweep_command(args: Any) -> int:
    """``workbench sweep``: run the grid, print a summary with each failure's cell; exit 8 on failures."""
    import sys

    result = run_sweep(args.grid, args.out, jobs=args.jobs, html=not args.no_html, progress=not args.no_progress,
                       engine=args.engine, address=args.address, retries=args.retries)
    code = _finish(result, "jobs", args.json, "sweep jobs")
    if not args.json:
        for r in result["failed"]:  # lost with a worker: no cell to show, so say what happened
            if r.get("attempts") and r.get("exec_count") is None:
                print(f"  {r['message']}", file=sys.stderr)
    return code


def run_report_command(args: Any) -> int:
    """``workbench report``: write report.csv and report.html into the folder."""
    paths = make_report(args.folder, overwrite=args.overwrite)
    res = collect_results(args.folder)
    if args.json:
        print(json.dumps({"csv": str(paths["csv"]), "html": str(paths["html"]), "rows": len(res["rows"]),
                          "kind": res["kind"]}, indent=2))
    else:
        print(f"{res['kind']} report: {len(res['rows'])} summary rows from {len(res['units'])} "
              f"{'jobs' if res['kind'] == 'sweep' else 'notebooks'}\n  {paths['csv']}\n  {paths['html']}")
    return 0


# ---------------------------------------------------------------------------------------
# keeping the stored notebooks clean

#: Cells whose stored output nbval compares (``--nbval-lax``); every other output is stripped.
CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"


def clean_notebook(path: str | Path, executed: str | Path | None = None) -> int:
    """Strip outputs, execution counts and run metadata from a stored notebook, keeping (or, from
    ``executed``, refreshing) the outputs of cells marked ``# NBVAL_CHECK_OUTPUT``.

    Maintainers run it after editing a notebook, with the notebook executed at its defaults
    (e.g. ``DIR/executed/NB.ipynb`` of a quick ``workbench run``). Returns the checked cells kept.

    Raises:
        ConfigError: a checked cell has no output to keep, or its output is an error.
    """
    import nbformat

    from .runinfo import atomic_write_text

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    fresh: dict[str, Any] = {}
    if executed is not None:
        ex = nbformat.read(Path(executed), as_version=4)
        fresh = {c.source: c.outputs for c in ex.cells if c.cell_type == "code" and CHECK_MARKER in c.source}
    kept = n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        n += 1
        cell.execution_count = None
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if CHECK_MARKER in cell.source:
            outputs = fresh.get(cell.source, cell.outputs)
            if not outputs or any(o.output_type == "error" for o in outputs):
                raise ConfigError(f"{path.name}: checked cell has no usable output:\n{cell.source[:200]}")
            cell.execution_count = n  # nbval fails a cell with outputs but no count as 'unrun'
            for o in outputs:
                if o.output_type == "execute_result":  # nbval compares the text only
                    o.execution_count = n
                    o.data = {k: v for k, v in o.data.items() if k == "text/plain"}
                    o.metadata = {}
            cell.outputs = outputs
            kept += 1
        else:
            cell.outputs = []
    for key in ("papermill", "widgets"):
        nb.metadata.pop(key, None)
    atomic_write_text(path, nbformat.writes(nb) + "\n")
    return kept
