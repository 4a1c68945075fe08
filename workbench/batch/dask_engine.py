"""The Dask engine of ``workbench sweep --engine dask``: a cluster (ours or the user's), threads per
host, and members retried when their worker dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..errors import ConfigError
from .sweep_job import failed_row, run_job

log = logging.getLogger(__name__)


def _worker_facts(dask_worker: Any) -> dict[str, Any]:
    """Run on every Dask worker (``Client.run``): its host, cores and task slots."""
    from distributed.comm import get_address_host

    return {"host": get_address_host(dask_worker.address), "cpus": os.cpu_count() or 1,
            "nthreads": dask_worker.state.nthreads}


def threads_by_host(client: Any) -> dict[str, int]:
    """Threads per member on each host: its cores over the task slots of all its workers together
    (two 1-thread workers on a 16-core machine: 8 threads each).

    Raises:
        ConfigError: the workers cannot import the workbench (it must be installed on every worker).
    """
    try:
        facts = client.run(_worker_facts)
    except Exception as e:
        if is_import_error(e):
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


def is_import_error(exc: BaseException) -> bool:
    """A worker could not unpickle our function: Dask reports that as a plain ``Exception`` whose
    text names the ``ModuleNotFoundError``."""
    return isinstance(exc, ImportError) or "ModuleNotFoundError" in str(exc) or "ImportError" in str(exc)



def _quiet_dask_logs() -> None:
    """Run on each worker of the sweep's own LocalCluster as it shuts down."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def dask_client(address: str | None, workers: int) -> Iterator[Any]:
    """A ``distributed.Client`` connected to the scheduler at ``address``, or to a LocalCluster of
    ``workers`` processes with one thread each, started here and closed again on exit.

    Raises:
        MissingDependencyError: dask.distributed is not installed.
        ConfigError: no scheduler answers at ``address``.
    """
    from ..errors import MissingDependencyError

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


def dask_rows(client: Any, tasks: Sequence[dict[str, Any]], retries: int) -> Iterable[dict[str, Any]]:
    """Summary rows as members finish on a Dask cluster. A member whose worker died (``KilledWorker``)
    or that raised outside its notebook is submitted again, up to ``retries`` times, then recorded as
    failed with the reason; the other members go on either way."""
    import uuid

    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from ..errors import WorkbenchError

    sweep = uuid.uuid4().hex[:8]
    attempts: dict[str, int] = {}
    running: dict[str, tuple[Any, dict[str, Any]]] = {}  # future key -> (future, task)

    def submit(task: dict[str, Any]) -> Any:
        n = attempts[task["job"]] = attempts.get(task["job"], 0) + 1
        fut = client.submit(run_job, task, key=f"workbench-sweep-{sweep}-{task['job']}-{n}", pure=False)
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
                if n <= retries and not isinstance(e, WorkbenchError) and not is_import_error(e):
                    log.warning("job %s: %s; running it again (retry %d of %d)", job, why, n, retries)
                    done.add(submit(task))
                    continue
                hint = "; is the workbench installed on every worker?" if is_import_error(e) else ""
                row = failed_row(task, e, f"job {job} failed outside its notebook after {n} attempt(s) "
                                           f"(retries {retries}): {why}{hint}", attempts=n)
            finally:
                fut.release()
            yield row
    finally:
        if running:  # interrupted: nothing of this sweep keeps running on the cluster
            client.cancel([f for f, _ in running.values()])
