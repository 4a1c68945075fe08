"""Executing notebooks headless: ``execute_notebook`` (one notebook, papermill, with its HTML
export) and ``run_notebooks`` (the whole set, in order, into a run folder).

Layout of a run folder (``workbench run --out DIR``)::

    DIR/run.json                  parameters, profile, versions, git commit
    DIR/summary.json              one row per notebook: status, seconds, failing cell
    DIR/executed/NB.ipynb, .html  the executed notebooks and their HTML export
    DIR/results/NB/               what each notebook wrote (tables, figures, checkpoints)
    DIR/report.csv, report.html   made by :func:`workbench.batch.report.make_report` at the end

Kernels always run the Python interpreter running the workbench (not whichever ``python3``
kernelspec happens to be installed), so a fresh clone's ``.venv`` is what executes notebooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bundled import bundled_dir
from ..errors import ConfigError, NotebookError
from ..nbparams import absolute_paths, check_notebook, literal_defaults
from ..runinfo import prepare_run_dir, run_metadata, write_json
from .report import make_report

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
    from ..profiles import PROFILES

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

    from ..runinfo import atomic_write_text

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
