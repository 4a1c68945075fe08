"""Training recipe benchmark: time and test accuracy of the default recipes.

Prints, for each (model, dataset, epochs), the wall time of training (epochs only and
total with evaluation) and the test accuracy, plus the machine it ran on. These are the
figures behind the README's claims:

* ``vit-micro`` (the default ViT) on ``fashion-mnist-mini`` with no flags other than
  ``--out``: >= 82 % test accuracy within 4 minutes on 2 CPU cores;
* ``cnn-small``: >= 85 % in under a minute;
* ``vit-micro`` on the full ``fashion-mnist`` with ``--epochs 20``: 90.66 % (14 epochs: 89.65 %).

Usage::

    python benchmarks/bench_train.py                      # the two mini-dataset recipes
    python benchmarks/bench_train.py --full               # also the full Fashion-MNIST run
    python benchmarks/bench_train.py --case vit-micro:fashion-mnist-mini:10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from workbench import data, models
from workbench.runinfo import set_seed
from workbench.train import TrainConfig, fit

DEFAULT_CASES = ["vit-micro:fashion-mnist-mini:", "cnn-small:fashion-mnist-mini:"]
FULL_CASES = ["vit-micro:fashion-mnist:20"]


def run_case(spec: str, device: str, seed: int) -> dict:
    model_name, data_name, epochs = spec.split(":")
    bundle = data.load(data_name, seed=seed)
    recipe = {**models.default_recipe(model_name), **({"epochs": int(epochs)} if epochs else {})}
    cfg = TrainConfig(seed=seed, device=device, **recipe)
    set_seed(seed)
    model = models.create(model_name, bundle.info)
    t0 = time.perf_counter()
    res = fit(model, bundle, cfg, progress=False)
    total = time.perf_counter() - t0
    return {"model": model_name, "data": data_name, "epochs": cfg.epochs, "train_s": res.metrics["total_train_time"],
            "total_s": total, "test_accuracy": res.metrics["test_accuracy"],
            "accuracy_by_epoch": [round(r["test_accuracy"], 2) for r in res.history]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="MODEL:DATA:EPOCHS (EPOCHS empty = recipe default)")
    ap.add_argument("--full", action="store_true", help="add the full Fashion-MNIST case")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cases = args.case or (DEFAULT_CASES + (FULL_CASES if args.full else []))
    machine = {"cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    rows = [run_case(c, args.device, args.seed) for c in cases]
    if args.json:
        print(json.dumps({"machine": machine, "results": rows}, indent=2))
        return
    print(f"machine: {machine}")
    print(f"{'model':<10} {'data':<19} {'epochs':>6} {'train s':>8} {'total s':>8} {'test acc':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['data']:<19} {r['epochs']:>6} {r['train_s']:>8.1f} {r['total_s']:>8.1f} "
              f"{r['test_accuracy']:>8.2f}%  by epoch: {r['accuracy_by_epoch']}")


if __name__ == "__main__":
    main()
