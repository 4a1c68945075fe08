"""Plain vs ``dnq`` on the default ViT: accuracy under PTQ and curvature, one seed, CPU.

Trains ``vit-micro`` on ``fashion-mnist-mini`` with the default recipe twice (plain, and
``dnq`` with W4A4 noise, multiplier 1), quantizes both at W8A8 ... W3A3 (per-channel
min-max weights, per-tensor min-max activations, attention matmuls quantized), and measures
top eigenvalue, Hessian trace, sharpness and the sigma-weighted-trace prediction of the
weight-quantization loss increase against the measured one, on 256 training images.

Writes ``OUT/ptq.csv``, ``OUT/flatness.csv``, ``OUT/results.json``. About 20 minutes on 2
CPU cores. This is a single-seed sanity check, not the seeded study of docs (issue 8).

    python benchmarks/plain_vs_dnq.py --out docs/results/plain_vs_dnq
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from workbench import data, flatness, models, ptq, train
from workbench.precondition import MethodConfig, create_method
from workbench.runinfo import run_metadata, set_seed, write_csv, write_json

METHODS = {"plain": {"method": "plain"},
           "dnq": {"method": "dnq", "w_bits": 4, "a_bits": 4, "noise_mult": 1.0}}
BITS = [(8, 8), (6, 6), (4, 8), (4, 4), (3, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    bundle = data.load("fashion-mnist-mini", seed=args.seed, n_calib=256)
    nets, fp = {}, {}
    for label, mc in METHODS.items():
        set_seed(args.seed)
        model = models.create("vit-micro", bundle.info)
        cfg = MethodConfig.from_dict(mc)
        res = train.fit(model, bundle, train.TrainConfig(seed=args.seed, device=args.device), create_method(cfg),
                        method_config=cfg.to_dict())
        nets[label], fp[label] = model.eval(), res.metrics
    calib = list(data.batches(bundle.calib, bundle.info, 128))
    test = list(data.batches(bundle.test, bundle.info, 500))
    rows = ptq.sweep(list(nets.items()), [ptq.PTQConfig(w_bits=w, a_bits=a) for w, a in BITS], calib, test)
    t0 = time.perf_counter()
    damage = flatness.damage_table(nets, calib, w_bits=(4, 3))
    write_csv(out / "ptq.csv", rows)
    write_csv(out / "flatness.csv", damage["rows"])
    write_json(out / "results.json", {**run_metadata(vars(args)), "fp": fp, "ptq": rows, "damage": damage,
                                      "flatness_seconds": time.perf_counter() - t0})
    for r in rows:
        print(f"{r['checkpoint']:<6} W{r['w_bits']}A{r['a_bits']}: {r['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
