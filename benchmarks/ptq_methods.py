"""The strong-PTQ table: plain, dnq and qat fine-tunes of the zoo's vit-micro, under every PTQ method.

For each zoo parent (``vit-micro-mini-s0/s1/s2``: the seeds), fine-tune it with ``plain`` (the
control), ``dnq`` (noise of a 4-bit target) and ``qat`` (W4A4) for the same steps and seed, through
the ``workbench train`` command a user would type. Then quantize each fine-tune at W4A4, W3A3
and W2A4 with:

* ``minmax``: round to nearest, min-max ranges;
* ``mse``: round to nearest, MSE-searched clipping for weights and activations;
* and on top of ``mse`` (one thing added each): ``mse+bc`` (bias correction), ``mse+adaround``
  (per-layer learned rounding), ``mse+qdrop`` (BRECQ block reconstruction with learned activation
  steps and QDrop, p = 0.5) and ``mse+repq`` (RepQ-ViT reparameterization).

Every row is appended to ``OUT/rows.csv`` as it is measured; a rerun keeps what is there and runs
only what is missing (fine-tunes included), so the table can be built over several sessions.
``OUT/ptq_methods.md`` gets mean +- std over the seeds, the paired difference of each arm against
``plain`` with its 95 % t interval, and the mean calibration time of each method.

    python benchmarks/ptq_methods.py --out docs/results/ptq_methods
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from workbench import stats
from workbench.ptq import PTQConfig, sweep_checkpoints
from workbench.runinfo import atomic_write_text, run_metadata, write_csv, write_json

BITS = [(4, 4), (3, 3), (2, 4)]
ARMS = {"plain": [], "dnq": ["--bits", "4"], "qat": ["--bits", "W4A4"]}


def ptq_methods(n_calib: int, recon_iters: int) -> dict[str, dict[str, Any]]:
    mse = {"observer": "mse"}
    return {
        "minmax": {"observer": "minmax"},
        "mse": mse,
        "mse+bc": {**mse, "bias_correction": True},
        "mse+adaround": {**mse, "reconstruction": "adaround", "recon_iters": recon_iters},
        "mse+qdrop": {**mse, "reconstruction": "brecq", "qdrop": 0.5, "recon_iters": recon_iters},
        "mse+repq": {**mse, "repq": True},
    }


def fine_tune(out: Path, arm: str, parent: int, epochs: float, train: bool = True) -> tuple[Path, str]:
    """The fine-tune's checkpoint (trained now unless it is there, or ``train`` is off) and the
    command that makes it."""
    run = out / "runs" / f"{arm}-s{parent}"
    cmd = ["workbench", "train", "--init", f"zoo:vit-micro-mini-s{parent}", "--method", arm, *ARMS[arm],
           "--epochs", str(epochs), "--seed", str(parent), "--out"]
    if train and not (run / "model.pt").exists():
        exe = [str(Path(sys.executable).with_name("workbench")), *cmd[1:], str(run)]
        subprocess.run(exe + (["--overwrite"] if run.exists() else []), check=True)
    return run / "model.pt", shlex.join([*cmd, f"OUT/runs/{run.name}"])  # OUT: this script's --out


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # CSV gives strings: back to the types the pairing and the means need
        r["seed"] = int(r["seed"])
        for k in ("accuracy", "loss", "calib_time_s"):
            r[k] = float(r[k])
    return rows


FLAGS = {"observer": "--observer {}", "bias_correction": "--bias-correction", "reconstruction": "--reconstruction {}",
         "qdrop": "--qdrop {}", "recon_iters": "--recon-iters {}", "repq": "--repq"}


def ptq_command(fields: dict[str, Any], n_calib: int, n_eval: int) -> str:
    """The ``workbench ptq`` command that quantizes one checkpoint as a column of the table does."""
    flags = [FLAGS[k].format(v) for k, v in fields.items() if v is not False]
    bits = ",".join(f"W{w}A{a}" for w, a in BITS)
    return f"workbench ptq CKPT --bits {bits} --n-calib {n_calib} --n-eval {n_eval} " + " ".join(flags)


def markdown(rows: list[dict[str, Any]], methods: list[str], commands: list[str],
             ptq_commands: dict[str, str] | None = None) -> str:
    configs = [f"W{w}A{a}" for w, a in BITS]
    q = [r for r in rows if r["config"] != "FP32" and r["column"] != "qat-own"]
    summary = stats.paired_summary(q, value="accuracy", arm="arm", pair="seed", by=("config", "column"))
    cell = {(s["config"], s["column"], s["arm"]): s for s in summary}
    lines = ["Test accuracy (%) of the zoo's vit-micro (fashion-mnist-mini), fine-tuned from each of the 3 zoo "
             "parents, then quantized. Each cell: mean +- std over the 3 parents (seeds); below each arm, its "
             "paired difference against `plain` (same parent, seed and steps) with the 95 % t interval over 3 "
             "pairs. Intervals are not corrected for the many cells compared.", ""]
    fp = stats.paired_summary([r for r in rows if r["config"] == "FP32"], value="accuracy", arm="arm",
                              pair="seed", by=("config",))
    lines.append("Full precision: " + ", ".join(f"{s['arm']} {s['mean']:.2f} +- {s['std']:.2f}" for s in fp) + ".")
    own = [r for r in rows if r["column"] == "qat-own"]
    if own:
        accs = [r["accuracy"] for r in own]
        mi = stats.mean_interval(accs)
        lines.append(f"QAT with its own learned W4A4 quantizers (attention matmuls in float): {mi['mean']:.2f} "
                     f"+- {mi['std']:.2f}.")
    lines.append("")
    for cfg in configs:
        lines += [f"### {cfg}", "", "| arm | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for arm in ARMS:
            vals = [cell.get((cfg, m, arm)) for m in methods]
            lines.append(f"| {arm} | " + " | ".join(f"{v['mean']:.2f} +- {v['std']:.2f}" if v else "-"
                                                   for v in vals) + " |")
            if arm != "plain":
                lines.append(f"| {arm} - plain | " + " | ".join(
                    f"{v['diff_mean']:+.2f} [{v['diff_ci_low']:+.2f}, {v['diff_ci_high']:+.2f}]"
                    if v and "diff_mean" in v else "-" for v in vals) + " |")
        lines.append("")
    lines += ["### Calibration time (s, mean over every model and bit setting)", "",
              "| " + " | ".join(methods) + " |", "|" + "---|" * len(methods)]
    times = [[r["calib_time_s"] for r in q if r["column"] == m] for m in methods]
    lines.append("| " + " | ".join(f"{sum(t) / len(t):.1f}" if t else "-" for t in times) + " |")
    if ptq_commands:
        lines += ["", "Each column as a command (CKPT: a fine-tune's `model.pt`):", "", "```",
                  *(f"{m:<13} {ptq_commands[m]}" for m in methods), "```"]
    lines += ["", "Commands: the fine-tunes (OUT is the script's --out folder), then the table itself:", "",
              "```", *commands, "python benchmarks/ptq_methods.py --out OUT", "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parents", default="0,1,2", help="zoo parents vit-micro-mini-sN (also the fine-tune seeds)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--recon-iters", type=int, default=100)
    ap.add_argument("--methods", default=None, help="comma list of columns (default all)")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite the report from OUT/rows.csv (e.g. after copying the rows elsewhere)")
    args = ap.parse_args()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    all_methods = ptq_methods(args.n_calib, args.recon_iters)
    methods = args.methods.split(",") if args.methods else list(all_methods)
    path = out / "rows.csv"
    rows = read_rows(path)
    commands = []
    for parent in [int(p) for p in args.parents.split(",")]:
        for arm in ARMS:
            ckpt, cmd = fine_tune(out, arm, parent, args.epochs, train=not args.report_only)
            commands.append(cmd)
            if args.report_only:
                continue
            done = {(r["config"], r["column"]) for r in rows if r["arm"] == arm and int(r["seed"]) == parent}
            for column in methods:
                configs = [PTQConfig(w_bits=w, a_bits=a, n_calib=args.n_calib, **all_methods[column])
                           for w, a in BITS if (f"W{w}A{a}", column) not in done]
                if not configs:
                    continue
                first = ("FP32", "fp") not in done

                def save(row: dict[str, Any], column: str = column, arm: str = arm, parent: int = parent,
                         done: set = done) -> None:
                    own = row["config"] == "FP32" or row["ptq_method"] == "qat"
                    col = "fp" if row["config"] == "FP32" else ("qat-own" if own else column)
                    rows.append({"arm": arm, "seed": parent, "column": col, **row,
                                 "checkpoint": str(Path(row["checkpoint"]).relative_to(out))})
                    done.add((row["config"], col))
                    write_csv(path, rows)

                sweep_checkpoints([ckpt], configs, n_eval=args.n_eval, include_fp=first, on_row=save)
    write_json(out / "run.json", run_metadata({**vars(args), "commands": commands}))
    text = markdown(rows, methods, commands,
                    {m: ptq_command(all_methods[m], args.n_calib, args.n_eval) for m in methods})
    atomic_write_text(out / "ptq_methods.md", text)
    print(text)


if __name__ == "__main__":
    main()
