"""One member of a sweep: its notebook executed in its own ``jobs/NNN`` folder, with the thread
pools sized for the jobs running beside it. Top-level functions, so that they pickle for a process
pool or a Dask worker.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .execute import execute_notebook

#: The thread-pool sizes a kernel reads at start-up (torch: OMP; NumPy's BLAS: MKL or OpenBLAS).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def kernel_threads(threads: int | None) -> Iterator[None]:
    """Size the thread pools of the kernels started inside the block, then restore this process's.

    A kernel reads them from its environment at start-up, so N concurrent jobs share the cores instead
    of oversubscribing them (on Dask it also replaces the nanny's default of 1 thread, which would
    starve a lone member). Restoring matters: a one-job sweep runs ``run_job`` in the caller's process, and
    a leaked ``OMP_NUM_THREADS=1`` would make every kernel started later single-threaded.
    """
    if not threads:
        yield
        return
    saved = {var: os.environ.get(var) for var in THREAD_VARS}
    os.environ.update({var: str(threads) for var in THREAD_VARS})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def run_job(args: dict[str, Any]) -> dict[str, Any]:
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
        threads = dask_threads(args.get("threads_by_host") or {})
    notebook, folder = Path(args["notebook"]), Path(args["folder"])
    if not notebook.is_file():
        raise ConfigError(f"{notebook} is not visible on {socket.gethostname()}: cluster workers need the "
                          "notebooks and the sweep folder on a shared filesystem, at the same paths")
    for sub in ("executed", "results"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    with kernel_threads(threads):
        row = execute_notebook(notebook, args["executed"], args["parameters"], html=args["html"],
                               cwd=notebook.parent)
    return {**row, "job": args["job"], "point": args["point"], "host": socket.gethostname(), "threads": threads}


def failed_row(task: Mapping[str, Any], exc: BaseException, message: str, **extra: Any) -> dict[str, Any]:
    """The summary row of a member that never produced one itself (its process or worker died)."""
    return {"job": task["job"], "point": task["point"], "notebook": Path(task["notebook"]).stem,
            "status": "failed", "error_name": type(exc).__name__, "error_value": str(exc), "cell": None,
            "exec_count": None, "message": message, **extra}




def dask_threads(by_host: Mapping[str, int]) -> int:
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
