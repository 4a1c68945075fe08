"""workbench.batch.sweep on a Dask cluster: ``workbench sweep --engine dask``, with and without ``--address``.

A real scheduler and two one-thread workers run on localhost, started as subprocesses with the
``dask scheduler``/``dask worker`` command lines (as on a real cluster); one test kills the worker
running a sleeping job and checks that the job is run again in a clean folder, or recorded as
failed with ``retries=0``, while every other job finishes. The notebooks are tiny, so most of
the time is process and kernel start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from workbench import cli
from workbench.batch import dask_engine, sweep, sweep_job
from workbench.cli import run as clirun
from workbench.errors import ConfigError

pytest.importorskip("distributed")

#: Each job records what it saw; a job with ``sleep`` writes its worker's pid to ``pid_file``
#: (the kernel's parent is the worker process) and sleeps, the first time only, so the test can
#: kill that worker mid-job and the retry then runs straight through.
CELLS = (
    "import json, os, pathlib, time\n"
    "out = pathlib.Path(out_dir)\n"
    "out.mkdir(parents=True)  # like nbt.start: refuses a folder an earlier attempt left behind\n"
    "facts = [{'x': x, 'omp': os.environ.get('OMP_NUM_THREADS'), 'mkl': os.environ.get('MKL_NUM_THREADS')}]\n"
    "(out / 'facts.json').write_text(json.dumps(facts))\n"
    "(out / f'attempt-{os.getpid()}.txt').write_text('started')",
    "if sleep and not pathlib.Path(pid_file).exists():\n"
    "    pathlib.Path(pid_file).write_text(str(os.getppid()))\n"
    "    time.sleep(sleep)",
    "if fail:\n    raise ValueError(f'x={x} is not allowed')",
    "(out / 'summary.json').write_text(json.dumps([{'x': x, 'double': 2 * x}]))",
)

EXPECTED_THREADS = str(max(1, (os.cpu_count() or 1) // 2))  # two one-thread workers on this host


def _grid(tmp_path: Path) -> Path:
    nb = tmp_path / "member.ipynb"
    pcell = new_code_cell("x = 1\nfail = False\nsleep = 0\npid_file = ''\nout_dir = None")
    pcell.metadata["tags"] = ["parameters"]
    note = new_notebook(cells=[new_markdown_cell("# sweep member"), pcell, *map(new_code_cell, CELLS)])
    note.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(note, nb)
    grid = tmp_path / "grid.yaml"
    # jobs 000 and 001 plain, 002 fails in a cell, 003 sleeps (its worker gets killed)
    grid.write_text(f"notebook: {nb}\nparameters: {{pid_file: {tmp_path / 'pid'}}}\ngrid:\n  x: [1, 2]\n"
                    "include:\n  - {x: 7, fail: true}\n  - {x: 5, sleep: 30}\n")
    return grid


def _kill_when_running(pid_file: Path, killed: list[int], timeout: float = 60) -> threading.Thread:
    """Kill (SIGKILL) the worker that writes ``pid_file``, from a background thread."""
    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = pid_file.read_text().strip() if pid_file.is_file() else ""
            if text:
                pid = int(text)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _check_others(rows: list[dict], tmp_path: Path) -> None:
    by_job = {r["job"]: r for r in rows}
    assert [by_job[j]["status"] for j in ("000", "001")] == ["ok"] * 2, rows
    failed = by_job["002"]
    assert failed["status"] == "failed" and failed["error_name"] == "ValueError"
    assert failed["exec_count"] is not None  # the failing cell is still reported from the cluster
    for j in ("000", "001"):
        facts = json.loads((tmp_path / "sweep" / "jobs" / j / "results" / "facts.json").read_text())
        # threads per job reach the kernel (the nanny's own default would be 1 thread)
        assert (facts[0]["omp"], facts[0]["mkl"]) == (EXPECTED_THREADS, EXPECTED_THREADS)
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [r["job"] for r in summary] == ["000", "001", "002", "003"]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker --nthreads 1`` processes on localhost."""
    from distributed import Client

    d = tmp_path_factory.mktemp("dask")
    sfile = d / "scheduler.json"
    # as docs/scaling.md recommends: the sweep's --retries is the only retry count, one job per thread
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
           "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
    dask = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sfile)], env=env, cwd=d,
                              stdout=subprocess.DEVNULL, stderr=(d / "scheduler.log").open("w"))]
    try:
        deadline = time.monotonic() + 60
        while not (sfile.is_file() and sfile.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sfile.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen([*dask, "worker", address, "--nthreads", "1", "--name", f"w{i}",
                                           "--no-dashboard"], env=env, cwd=d, stdout=subprocess.DEVNULL,
                                          stderr=(d / f"worker{i}.log").open("w")))
        with Client(address, set_as_default=False) as c:
            c.wait_for_workers(2, timeout=90)
        yield address
        with Client(address, set_as_default=False) as c:
            c.shutdown()  # scheduler and workers together: quicker than a signal to each
    finally:
        for p in reversed(procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_cli_sweep_on_dask_address_survives_a_killed_worker(scheduler: str, tmp_path: Path, capsys) -> None:
    grid = _grid(tmp_path)
    killed: list[int] = []
    killer = _kill_when_running(tmp_path / "pid", killed)
    code = cli.main(["sweep", str(grid), "--out", str(tmp_path / "sweep"), "--engine", "dask",
                     "--address", scheduler, "--retries", "1", "--no-html", "--no-progress"])
    killer.join(timeout=1)
    assert killed, "the sleeping job never started"
    assert code == 8  # job 002 fails in a cell, as it should
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    _check_others(rows, tmp_path)
    retried = rows[3]
    assert retried["status"] == "ok" and retried["attempts"] == 2, retried
    assert all(r["attempts"] == 1 for r in rows[:3])
    # the retry cleared what the killed attempt left: one attempt marker, the finished one
    results = tmp_path / "sweep" / "jobs" / "003" / "results"
    assert len(list(results.glob("attempt-*.txt"))) == 1
    assert json.loads((results / "summary.json").read_text()) == [{"x": 5, "double": 10}]
    meta = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert meta["engine"] == "dask" and meta["address"] == scheduler and meta["retries"] == 1
    out = capsys.readouterr().out
    assert "3 of 4 succeeded" in out and "cell [" in out


def test_local_dask_cluster_without_retries_marks_the_lost_job_failed(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    killed: list[int] = []
    killer = _kill_when_running(tmp_path / "pid", killed)
    res = sweep.run_sweep(grid, tmp_path / "sweep", engine="dask", jobs=2, retries=0, html=False,
                           progress=False, report=False)
    killer.join(timeout=1)
    assert killed, "the sleeping job never started"
    _check_others(res["jobs"], tmp_path)
    lost = res["jobs"][3]
    assert lost["status"] == "failed" and lost["attempts"] == 1 and lost["error_name"] == "KilledWorker"
    assert "worker died" in lost["message"] and "retries 0" in lost["message"]
    assert {r["job"] for r in res["failed"]} == {"002", "003"}
    meta = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert meta["engine"] == "dask" and meta["address"].startswith("tcp://")


def test_job_clears_a_killed_attempts_folder(tmp_path: Path) -> None:
    grid = sweep.load_grid(_grid(tmp_path))
    folder = tmp_path / "sweep" / "jobs" / "000"
    threads_before = {var: os.environ.get(var) for var in sweep_job.THREAD_VARS}
    for stale in ("executed/member.ipynb", "results/attempt-1.txt", "results/figures/half.html"):
        (folder / stale).parent.mkdir(parents=True, exist_ok=True)
        (folder / stale).write_text("left by a killed attempt")
    row = sweep_job.run_job({"job": "000", "point": {"x": 2}, "notebook": grid["notebook"], "html": False,
                       "parameters": {"x": 2, "out_dir": str(folder / "results")}, "folder": str(folder),
                       "executed": str(folder / "executed" / "member.ipynb"), "threads": 1})
    # the notebook refuses an existing out_dir (as nbt.start does): without the clearing it would fail
    assert row["status"] == "ok", row.get("message")
    assert not (folder / "results" / "attempt-1.txt").exists()
    assert not (folder / "results" / "figures" / "half.html").exists()
    assert "left by" not in (folder / "executed" / "member.ipynb").read_text()
    # the member's thread count reached its kernel only: this process (and every kernel it starts
    # later, e.g. nbval's) keeps its own thread pools
    assert {var: os.environ.get(var) for var in sweep_job.THREAD_VARS} == threads_before


def test_threads_by_host_share_each_hosts_cores() -> None:
    class FakeClient:
        def run(self, fn):
            return {"tcp://a:1": {"host": "a", "cpus": 16, "nthreads": 1},
                    "tcp://a:2": {"host": "a", "cpus": 16, "nthreads": 1},
                    "tcp://b:1": {"host": "b", "cpus": 8, "nthreads": 4},
                    "tcp://c:1": {"host": "c", "cpus": 2, "nthreads": 4}}

    assert dask_engine.threads_by_host(FakeClient()) == {"a": 8, "b": 2, "c": 1}

    class NoWorkbench:
        def run(self, fn):  # how Dask reports a worker that cannot unpickle the function
            raise Exception("ModuleNotFoundError(\"No module named 'workbench'\")")

    with pytest.raises(ConfigError, match="install it on every worker"):
        dask_engine.threads_by_host(NoWorkbench())


def test_engine_flags_and_their_errors(tmp_path: Path) -> None:
    import argparse

    import dask

    p = argparse.ArgumentParser()
    clirun.add_sweep_parser(p.add_subparsers(dest="command"), lambda sp: sp.add_argument("--json"))
    a = p.parse_args(["sweep", "g.yaml", "--out", "y", "--engine", "dask", "--address", "tcp://h:8786",
                      "--retries", "2"])
    assert (a.engine, a.address, a.retries) == ("dask", "tcp://h:8786", 2)
    a = p.parse_args(["sweep", "g.yaml", "--out", "y"])
    assert (a.engine, a.address, a.retries) == ("local", None, 1)
    grid = _grid(tmp_path)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):  # nothing listens on port 9
        for kwargs, match in [({"engine": "ray"}, "unknown sweep engine"),
                              ({"address": "tcp://h:8786"}, "use it with engine 'dask'"),
                              ({"engine": "dask", "retries": -1}, "retries must be"),
                              ({"engine": "dask", "address": "tcp://127.0.0.1:9"}, "no Dask scheduler answers")]:
            with pytest.raises(ConfigError, match=match):
                sweep.run_sweep(grid, tmp_path / "s", progress=False, **kwargs)
    assert not (tmp_path / "s").exists()
