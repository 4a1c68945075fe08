"""Benchmark: the weight-quantization prediction at several bit widths, one trace per width against
one shared trace (``flatness.weight_quant_predictions``).

Per-channel symmetric steps of two widths differ by one constant factor, so the sigma-weighted
trace of the second width is the first's times that factor squared: the shared version runs one
deflated Hutchinson estimate instead of one per width and measures the rest (round-to-nearest loss,
first-order term, uniform-noise loss) at every width, as before. This is what the fine-tune study's
curvature report does for every member (``w_bits: [4, 3]``, 128 training images, 10 Lanczos steps,
10 probes).

Both versions run interleaved in one process, ``--rounds`` times each on the same model and batch,
so the ratio is measured side by side on whatever else shares the CPU. The model is a zoo entry
(default ``vit-micro-mini-s0``, a converged model: a trained network's Hessian is the one whose
trace is hard to estimate). Prints the median wall time of each, their ratio and the Hessian-vector
products each needed, and with ``--json`` writes them with the run's parameters.

Run::

    python benchmarks/bench_curvature_widths.py                    # vit-micro-mini-s0, W4 and W3
    python benchmarks/bench_curvature_widths.py --bits 8,6,4,3,2 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench import flatness as fl
from workbench.flatness import prediction
from workbench.runinfo import run_metadata, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:vit-micro-mini-s0", help="zoo:NAME or a checkpoint folder")
    ap.add_argument("--bits", default="4,3", help="weight bit widths, comma-separated")
    ap.add_argument("--images", type=int, default=128, help="training images the Hessian is taken on")
    ap.add_argument("--deflate", type=int, default=10)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="rounds of both versions run first and not timed")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from workbench import data
    from workbench.batch.members import member_bundle
    from workbench.zoo import load_init

    model, ckpt, _ = load_init(args.model)
    model.eval()
    bundle = member_bundle(ckpt, val_size=1000, split_seed=0)  # the fine-tune study's training split
    batch = next(iter(data.batches(bundle.train, bundle.info, args.images)))
    bits = [int(b) for b in args.bits.split(",")]
    opts = {"deflate": args.deflate, "min_probes": args.probes, "max_probes": args.probes, "noise_samples": 8}
    counts = {"separate": 0, "shared": 0}
    real = prediction.hutchinson_trace

    def run(version: str) -> list:
        def counted(*a, **k):
            res = real(*a, **k)
            counts[version] += res.hvps
            return res

        prediction.hutchinson_trace = counted
        try:
            gen = torch.Generator().manual_seed(0)
            if version == "separate":
                return [fl.weight_quant_prediction(model, batch, w_bits=b, generator=gen, **opts) for b in bits]
            return fl.weight_quant_predictions(model, batch, w_bits=bits, generator=gen, **opts)
        finally:
            prediction.hutchinson_trace = real

    wall: dict[str, list[float]] = {"separate": [], "shared": []}
    last: dict[str, list] = {}
    for r in range(args.warmup + args.rounds):
        for version in wall:
            t0 = time.perf_counter()
            last[version] = run(version)
            if r >= args.warmup:
                wall[version].append(time.perf_counter() - t0)
    hvps = {v: counts[v] // (args.warmup + args.rounds) for v in counts}
    med = {v: statistics.median(t) for v, t in wall.items()}
    print(f"model {args.model}, {args.images} images, widths {bits}, {args.deflate} Lanczos steps + "
          f"{args.probes} probes per trace, threads {torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} warm-up")
    print(f"{'version':<9} {'wall s':>8} {'x separate':>11} {'HVPs':>6}")
    for v in wall:
        print(f"{v:<9} {med[v]:8.2f} {med[v] / med['separate']:11.3f} {hvps[v]:6d}")
    print("sigma-weighted trace per width (separate estimates | shared, scaled):")
    for a, b in zip(last["separate"], last["shared"], strict=True):
        print(f"  W{a.w_bits}: {a.sigma_trace:.4g} +- {a.sigma_trace_stderr:.2g} | {b.sigma_trace:.4g} +- "
              f"{b.sigma_trace_stderr:.2g}")
    if args.json:
        write_json(args.json, {**run_metadata(vars(args)), "wall_median_s": med, "wall_s": wall,
                               "hvps": hvps, "ratio_shared_to_separate": med["shared"] / med["separate"],
                               "sigma_trace": {f"W{a.w_bits}": {"separate": [a.sigma_trace, a.sigma_trace_stderr],
                                                                "shared": [b.sigma_trace, b.sigma_trace_stderr]}
                                               for a, b in zip(last["separate"], last["shared"], strict=True)}})


if __name__ == "__main__":
    main()
