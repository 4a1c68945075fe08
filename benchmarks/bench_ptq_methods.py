"""Calibration time of each PTQ method relative to min-max, side by side on the same model and images.

One process, one model (the zoo's ``vit-micro-mini-s0`` by default), one calibration set: round to
nearest with min-max and MSE ranges, bias correction, AdaRound, BRECQ, BRECQ + QDrop and the RepQ
reparameterization, each at the same bits. The cheap methods are repeated and the median taken;
the reconstructions run once (they take minutes). Goal from the issue: BRECQ on vit-micro at W4A4
in at most 3 minutes on 2 cores. Writes ``--out`` as CSV when given.

    python benchmarks/bench_ptq_methods.py
    python benchmarks/bench_ptq_methods.py --bits W3A3 --recon-iters 200 --out bench_ptq_methods.csv
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench import nbtools, quant, zoo
from workbench.ptq import PTQConfig, quantize_model
from workbench.runinfo import write_csv

METHODS = {
    "minmax": {},
    "mse": {"observer": "mse"},
    "bias correction": {"bias_correction": True},
    "adaround": {"reconstruction": "adaround"},
    "brecq": {"reconstruction": "brecq"},
    "brecq+qdrop": {"reconstruction": "brecq", "qdrop": 0.5},
    "repq": {"repq": True},
}
CHEAP = {"minmax", "mse", "bias correction", "repq"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default="zoo:vit-micro-mini-s0")
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--recon-iters", type=int, default=PTQConfig.recon_iters)
    p.add_argument("--reps", type=int, default=3, help="repeats of the cheap methods (median)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="CSV file for the rows")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, a = quant.parse_bits_pair(args.bits)
    model = zoo.load_init(args.init)[0].eval()
    bundle = nbtools.load_data("fashion-mnist-mini", init=args.init, n_calib=args.n_calib)
    calib = list(nbtools.calib_batches(bundle, args.n_calib))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.init} {args.bits}, "
          f"{args.n_calib} calibration images, {args.recon_iters} reconstruction steps per unit")
    quantize_model(model, PTQConfig(w_bits=w, a_bits=a, n_calib=args.n_calib), calib)  # warm-up, untimed
    rows = []
    for name in args.methods.split(","):
        cfg = PTQConfig(w_bits=w, a_bits=a, n_calib=args.n_calib, recon_iters=args.recon_iters, **METHODS[name])
        times = []
        for _ in range(args.reps if name in CHEAP else 1):
            t0 = time.perf_counter()
            quantize_model(model, cfg, calib)
            times.append(time.perf_counter() - t0)
        rows.append({"method": name, "ptq_method": cfg.method, "config": cfg.label, "calib_s": statistics.median(times),
                     "recon_iters": args.recon_iters if cfg.reconstruction != "none" else None})
        print(f"{name:<16} {rows[-1]['calib_s']:8.2f} s", flush=True)
    base = next((r["calib_s"] for r in rows if r["method"] == "minmax"), None)
    for r in rows:
        r["ratio_to_minmax"] = r["calib_s"] / base if base else None
    print("\nmethod            calib s   x min-max")
    for r in rows:
        ratio = f"{r['ratio_to_minmax']:9.1f}" if r["ratio_to_minmax"] else "        -"
        print(f"{r['method']:<16} {r['calib_s']:8.2f} {ratio}")
    if args.out:
        write_csv(args.out, rows)


if __name__ == "__main__":
    main()
