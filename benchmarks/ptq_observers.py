"""The PTQ observer table: bit settings x range observers x weight granularity for one checkpoint.

For a trained workbench checkpoint (e.g. a plainly trained default ViT), quantize at W8A8, W6A6,
W4A8, W4A4 and W3A3 with the min-max, percentile and MSE observers (used for the weight clipping
and the activation ranges alike), with per-output-channel and with per-tensor weights, calibrated
on 256 training images and evaluated on the test split. Writes ``OUT/observers.csv``,
``OUT/observers.json`` (rows plus run metadata) and ``OUT/observers.md`` (accuracy table).

    python benchmarks/ptq_observers.py CKPT --out docs/results/ptq_observers
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.ptq import PTQConfig, sweep_checkpoints
from workbench.runinfo import atomic_write_text, run_metadata, write_csv, write_json

BITS = [(8, 8), (6, 6), (4, 8), (4, 4), (3, 3)]
OBSERVERS = ["minmax", "percentile", "mse"]


def markdown(rows: list[dict], fp: float) -> str:
    configs = [f"W{w}A{a}" for w, a in BITS]
    lines = [f"Full precision: {fp:.2f} %. Test accuracy (%) after PTQ:", "",
             "| weights | observer | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
    for gran in ("per-channel", "per-tensor"):
        for obs in OBSERVERS:
            acc = {r["config"]: r["accuracy"] for r in rows if r["observer"] == obs and r["w_granularity"] == gran}
            lines.append(f"| {gran} | {obs} | " + " | ".join(f"{acc.get(c, float('nan')):.2f}" for c in configs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    configs = [PTQConfig(w_bits=w, a_bits=a, observer=obs, w_per_channel=pc, n_calib=args.n_calib)
               for pc in (True, False) for obs in OBSERVERS for w, a in BITS]
    rows = sweep_checkpoints([args.checkpoint], configs, device=args.device)
    fp = next(r["accuracy"] for r in rows if r["config"] == "FP32")
    out = Path(args.out)
    write_csv(out / "observers.csv", rows)
    write_json(out / "observers.json", {**run_metadata(vars(args)), "rows": rows})
    atomic_write_text(out / "observers.md", markdown([r for r in rows if r["config"] != "FP32"], fp))
    print(markdown([r for r in rows if r["config"] != "FP32"], fp))


if __name__ == "__main__":
    main()
