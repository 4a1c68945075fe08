"""Sweep throughput: the Dask engine (a LocalCluster of 2 one-thread workers) against the local
process pool (2 jobs), on the same small grid, side by side in one run.

Each member is a papermill execution of a small generated notebook that, like the real ones,
imports torch and the workbench, then does a fixed amount of matmul work (``--work`` seconds
on one core, calibrated once). The engines alternate (local, dask, local, dask, ...) so machine
load affects both alike; medians are reported. Two figures per engine, in members per minute:

* ``wall``: what the user waits for ``run_sweep`` (for Dask: starting and stopping the cluster too);
* ``jobs``: from the first job submitted to the last finished (the engine's own overhead per job).

    python benchmarks/bench_sweep.py                       # 6 members, 2 s of work each, 2 rounds
    python benchmarks/bench_sweep.py --members 8 --work 5 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nbformat
import torch
from nbformat.v4 import new_code_cell, new_notebook

from workbench.batch import sweep

WORK = (
    "import time, torch\n"
    "import workbench.nbtools as nbt  # the import every real notebook pays\n"
    "a = torch.randn(256, 256)\n"
    "for _ in range(rounds):\n"
    "    a = torch.tanh(a @ a)\n"
    "nbt.save_summary(nbt.prepare_out_dir(out_dir, 'bench'), [{'x': x, 'rounds': rounds}])"
)


def _rounds_for(seconds: float) -> int:
    """How many 256x256 matmul rounds take ``seconds`` on one thread here."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        a = torch.tanh(a @ a)
        n += 1
    return max(1, int(n * seconds / (time.perf_counter() - t0)))


def _grid(folder: Path, members: int, rounds: int) -> Path:
    params = new_code_cell(f"x = 0\nrounds = {rounds}\nout_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell(WORK)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "bench_member.ipynb")
    grid = folder / "grid.yaml"
    grid.write_text(f"notebook: {folder / 'bench_member.ipynb'}\ngrid:\n  x: {list(range(members))}\n")
    return grid


def _one(grid: Path, out: Path, engine: str, jobs: int) -> dict:
    t0 = time.perf_counter()
    res = sweep.run_sweep(grid, out, jobs=jobs, engine=engine, html=False, progress=False, report=False)
    wall = time.perf_counter() - t0
    n = len(res["jobs"])
    if res["failed"]:
        raise SystemExit(f"{engine}: {len(res['failed'])} members failed: {res['failed'][0].get('message')}")
    return {"engine": engine, "wall_s": wall, "jobs_s": res["seconds"], "wall_per_min": 60 * n / wall,
            "jobs_per_min": 60 * n / res["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=6, help="grid points per sweep")
    ap.add_argument("--work", type=float, default=2.0, help="seconds of single-thread compute per member")
    ap.add_argument("--jobs", type=int, default=2, help="local processes / Dask workers")
    ap.add_argument("--reps", type=int, default=2, help="rounds of (local, dask)")
    args = ap.parse_args()
    rounds = _rounds_for(args.work)
    print(f"{args.members} members, {args.work:.1f} s of work each ({rounds} matmul rounds), "
          f"{args.jobs} at a time, {args.reps} rounds\n", flush=True)
    runs: dict[str, list[dict]] = {"local": [], "dask": []}
    with tempfile.TemporaryDirectory() as tmp:
        grid = _grid(Path(tmp), args.members, rounds)
        for rep in range(args.reps):
            for engine in ("local", "dask"):
                r = _one(grid, Path(tmp) / f"{engine}-{rep}", engine, args.jobs)
                runs[engine].append(r)
                print(f"  round {rep + 1}  {engine:<5}  wall {r['wall_s']:6.1f} s ({r['wall_per_min']:5.1f}/min)  "
                      f"jobs {r['jobs_s']:6.1f} s ({r['jobs_per_min']:5.1f}/min)", flush=True)
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("wall_per_min", "jobs_per_min")}
           for e, rs in runs.items()}
    print("\nmembers per minute (median)   local pool   dask LocalCluster   dask / local")
    for k, label in (("wall_per_min", "wall (incl. cluster start)"), ("jobs_per_min", "jobs only")):
        print(f"  {label:<27} {med['local'][k]:10.1f}   {med['dask'][k]:17.1f}   {med['dask'][k] / med['local'][k]:11.2f}x")


if __name__ == "__main__":  # the process pool and the LocalCluster spawn fresh interpreters
    main()
