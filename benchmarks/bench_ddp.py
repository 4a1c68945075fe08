"""Data-parallel training on CPU: N processes (DDP, gloo) vs one process, time per epoch side by side.

Both sides train the same model on the same data with the same global batch and use the same
cores: one process with N threads, or N processes with one thread each (what ``torchrun``
does by default). Rounds alternate one process and N processes, so load from other jobs hits
both alike; the table shows medians over rounds of the training time per epoch (evaluation
excluded), their ratio, and the final test accuracy (equal up to float rounding for ``plain``).
For noise methods it also shows the time spent synchronizing activation ranges.

    python benchmarks/bench_ddp.py                                  # vit-micro, fashion-mnist-mini
    python benchmarks/bench_ddp.py --methods plain --rounds 3 --epochs 2
    python benchmarks/bench_ddp.py --model cnn-small --nproc 2 --limit-train 4096
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from workbench import distributed, models, nbtools, noise
from workbench.precondition import MethodConfig, create_method
from workbench.runinfo import set_seed
from workbench.train import TrainConfig, fit


def train_once(args: dict[str, Any], method: str) -> dict[str, Any]:
    """One ``fit`` (in whatever process group exists); times per epoch, accuracy, range-sync time."""
    bundle = nbtools.load_data(args["data"], limit_train=args["limit_train"] or None)
    recipe = {**models.default_recipe(args["model"]), "epochs": args["epochs"], "device": "cpu", "seed": 0}
    if args["batch_size"]:
        recipe["batch_size"] = args["batch_size"]
    set_seed(0)
    model = models.create(args["model"], bundle.info)
    sync = {"calls": 0, "seconds": 0.0}
    original = noise.NoiseHandle.sync_ranges

    def timed(self: noise.NoiseHandle) -> bool:
        t0 = time.perf_counter()
        exchanged = original(self)
        sync["seconds"] += time.perf_counter() - t0
        sync["calls"] += int(exchanged)
        return exchanged

    noise.NoiseHandle.sync_ranges = timed  # type: ignore[method-assign]
    try:
        m = create_method(MethodConfig(method=method))
        res = fit(model, bundle, TrainConfig(**recipe), m, method_config=m.describe(), progress=False)
    finally:
        noise.NoiseHandle.sync_ranges = original  # type: ignore[method-assign]
    return {"epoch_s": [r["epoch_time"] for r in res.history], "eval_s": [r["eval_time"] for r in res.history],
            "steps": round(res.history[0]["epoch_time"] / res.history[0]["step_time"]),
            "test_accuracy": res.metrics["test_accuracy"], "sync": sync}


def _worker(rank: int, world: int, port: int, args: dict[str, Any], method: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args["threads_per_proc"])
    distributed.init_from_env("cpu")
    try:
        row = train_once(args, method)
        if distributed.is_main():
            Path(out).write_text(json.dumps(row))
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_spawned(args: dict[str, Any], method: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(_worker, args=(args["nproc"], _free_port(), args, method, out), nprocs=args["nproc"], join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-micro")
    ap.add_argument("--data", default="fashion-mnist-mini")
    ap.add_argument("--methods", default="plain,dnq")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel side")
    ap.add_argument("--threads-per-proc", type=int, default=1, help="torch threads of each of those processes")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating (1 process, N processes) rounds")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: the model's recipe)")
    ap.add_argument("--limit-train", type=int, default=0, help="training images (0: all)")
    ap.add_argument("--json", action="store_true")
    args = vars(ap.parse_args())
    one_threads = args["nproc"] * args["threads_per_proc"]
    methods = [m.strip() for m in args["methods"].split(",") if m.strip()]
    results: dict[str, dict[str, list]] = {m: {"one": [], "many": []} for m in methods}
    loads = []
    for _ in range(args["rounds"]):
        for method in methods:
            loads.append(os.getloadavg()[0])
            torch.set_num_threads(one_threads)
            results[method]["one"].append(train_once(args, method))
            loads.append(os.getloadavg()[0])
            results[method]["many"].append(train_spawned(args, method))
    rows = []
    for method, r in results.items():
        one = statistics.median(e for run in r["one"] for e in run["epoch_s"])
        many = statistics.median(e for run in r["many"] for e in run["epoch_s"])
        sync = r["many"][-1]["sync"]
        rows.append({"method": method, "one_process_s_per_epoch": one, "n_process_s_per_epoch": many,
                     "speedup": one / many, "steps_per_epoch": r["one"][-1]["steps"],
                     "one_process_eval_s": statistics.median(e for run in r["one"] for e in run["eval_s"]),
                     "n_process_eval_s": statistics.median(e for run in r["many"] for e in run["eval_s"]),
                     "test_accuracy_one": r["one"][-1]["test_accuracy"],
                     "test_accuracy_n": r["many"][-1]["test_accuracy"],
                     "range_syncs_per_epoch": sync["calls"] / args["epochs"],
                     "range_sync_share": sync["seconds"] / sum(r["many"][-1]["epoch_s"])})
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "load_avg_1min_during": loads}
    if args["json"]:
        print(json.dumps({"args": args, "machine": machine, "results": rows}, indent=2))
        return
    n = args["nproc"]
    print(f"{args['model']} on {args['data']}, {args['epochs']} epoch(s) per run, {args['rounds']} rounds; "
          f"1 process x {one_threads} threads vs {n} processes x {args['threads_per_proc']} thread(s) (gloo)")
    print(f"machine: {machine['cpus']} CPUs, 1-min load average during the runs: "
          f"{', '.join(f'{v:.1f}' for v in loads)}")
    print(f"{'method':<8} {'steps':>6} {'1 proc s/ep':>12} {f'{n} procs s/ep':>13} {'speedup':>8} "
          f"{'eval 1/' + str(n):>12} {'acc 1 proc':>11} {f'acc {n} procs':>12} {'range sync':>11}")
    for r in rows:
        sync = f"{100 * r['range_sync_share']:.2f} %" if r["range_syncs_per_epoch"] else "-"
        print(f"{r['method']:<8} {r['steps_per_epoch']:>6} {r['one_process_s_per_epoch']:>12.2f} "
              f"{r['n_process_s_per_epoch']:>13.2f} {r['speedup']:>7.2f}x "
              f"{r['one_process_eval_s']:>5.2f}/{r['n_process_eval_s']:<5.2f} "
              f"{r['test_accuracy_one']:>10.2f}% {r['test_accuracy_n']:>11.2f}% {sync:>11}")


if __name__ == "__main__":
    main()
