"""PTQ benchmark: calibration time per observer, and quantized-eval time relative to FP eval.

FP and quantized evaluations are interleaved (FP, Q, FP, Q, ...) and medians reported, so
machine load affects both sides alike (the ratio of the fastest runs is printed too: on a
busy machine memory-bound elementwise work slows down more than the matmuls do). Goal: quantized eval at most 1.3x FP eval: weights are
quantized once at conversion, so at run time only activations pass through one fused
fake-quant kernel per quantized tensor.

    python benchmarks/bench_ptq.py                      # vit-micro and resnet18, random weights
    python benchmarks/bench_ptq.py --models vit-micro --reps 7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench import models as wm
from workbench.ptq import PTQConfig, quantize_model


def _timed_eval(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - t0


def bench_model(name: str, *, n_calib: int, n_eval: int, batch_size: int, reps: int,
                observers: list[str], bits: list[str]) -> list[dict]:
    torch.manual_seed(0)
    model = wm.create(name, num_classes=10, in_chans=1, img_size=28).eval()
    g = torch.Generator().manual_seed(0)
    calib = list(torch.randn(n_calib, 1, 28, 28, generator=g).split(batch_size))
    evals = list(torch.randn(n_eval, 1, 28, 28, generator=g).split(batch_size))
    rows = []
    for obs in observers:
        for label in bits:
            w, a = label.upper().lstrip("W").split("A")
            cfg = PTQConfig(w_bits=int(w), a_bits=None if int(a) >= 32 else int(a), observer=obs, n_calib=n_calib)
            qm = quantize_model(model, cfg, calib)
            _timed_eval(model, evals[:1])  # warm-up both
            _timed_eval(qm, evals[:1])
            fp_t, q_t = [], []
            for _ in range(reps):
                fp_t.append(_timed_eval(model, evals))
                q_t.append(_timed_eval(qm, evals))
            fp, q = statistics.median(fp_t), statistics.median(q_t)
            # the fastest run is the least disturbed by other load on a shared machine
            ratio_min = min(q_t) / min(fp_t)
            rows.append(dict(model=name, config=cfg.label, observer=obs, calib_s=qm.calib_time_s, fp_eval_s=fp,
                             q_eval_s=q, ratio=q / fp, ratio_min=ratio_min))
            print(f"{name:<10} {cfg.label:<6} {obs:<10} calib {qm.calib_time_s:7.2f}s   "
                  f"FP eval {fp:6.3f}s   quantized eval {q:6.3f}s   ratio {q / fp:5.2f}x "
                  f"(fastest runs: {ratio_min:4.2f}x)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit-micro,resnet18")
    p.add_argument("--observers", default="minmax,percentile,mse")
    p.add_argument("--bits", default="W8A8,W4A4", help="configs whose eval time is compared with FP")
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n_calib={args.n_calib}, "
          f"n_eval={args.n_eval}, batch {args.batch_size}, median of {args.reps} interleaved runs")
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, n_calib=args.n_calib, n_eval=args.n_eval, batch_size=args.batch_size,
                            reps=args.reps, observers=args.observers.split(","), bits=args.bits.split(","))
    worst = max(r["ratio"] for r in rows)
    print(f"worst quantized/FP eval ratio (medians): {worst:.2f}x (goal <= 1.30x)")


if __name__ == "__main__":
    main()
