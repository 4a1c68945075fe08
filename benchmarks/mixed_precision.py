"""Curvature-guided mixed precision against its baselines at the same budget.

For each checkpoint (e.g. a plain and a dnq fine-tune of the same zoo parent) and each average
weight-bit budget and activation width: the curvature allocation (``workbench.ptq.allocate_bits``),
the uniform widths that bracket the budget, ``--random`` random allocations through the same
exact solver, and the error-norm proxy (no curvature). Each is quantized (MSE observer) and
evaluated; the table gives accuracy and loss, the allocation time, and Spearman's rho between
predicted and measured loss increase over every allocation tried (with its interval).

    python benchmarks/mixed_precision.py CKPT [CKPT ...] --out docs/results/mixed_precision
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench import stats
from workbench.ptq import sweep
from workbench.ptq.analysis import checkpoint_data
from workbench.ptq.mixed import (
    allocate_bits,
    layer_sensitivities,
    proxy_allocation,
    random_allocation,
    uniform_allocation,
)
from workbench.runinfo import atomic_write_text, run_metadata, write_csv, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--labels", default=None, help="comma list, one per checkpoint (default: file names)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budgets", default="3.0,3.5")
    ap.add_argument("--abits", default="4,8")
    ap.add_argument("--random", type=int, default=5)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    labels = args.labels.split(",") if args.labels else [Path(c).parent.parent.name or Path(c).stem
                                                         for c in args.checkpoints]
    budgets = [float(b) for b in args.budgets.split(",")]
    abits = [int(a) for a in args.abits.split(",")]
    rows: list[dict[str, Any]] = []
    allocations: list[dict[str, Any]] = []
    for label, path in zip(labels, args.checkpoints):
        model, method, calib, evals = checkpoint_data(path, args.n_calib, n_eval=args.n_eval)
        t0 = time.perf_counter()
        sens = layer_sensitivities(model, calib[:1], generator=torch.Generator().manual_seed(0))
        sens_s = time.perf_counter() - t0
        fp = sweep([(label, model, method)], [], calib, evals, progress=False)[0]
        for a in abits:
            for budget in budgets:
                t0 = time.perf_counter()
                allocs = [allocate_bits(model, budget=budget, a_bits=a, sensitivities=sens)]
                solve_s = time.perf_counter() - t0
                for b in sorted({math.floor(budget), math.ceil(budget)}):
                    allocs.append(uniform_allocation(sens, int(b), a_bits=a))
                rng = np.random.default_rng(0)
                allocs += [random_allocation(sens, budget, a_bits=a, generator=rng) for _ in range(args.random)]
                allocs.append(proxy_allocation(model, sens, budget, a_bits=a))
                configs = [al.config(observer="mse", n_calib=args.n_calib) for al in allocs]
                got = sweep([(label, model, method)], configs, calib, evals, include_fp=False, progress=False)
                for i, (al, r) in enumerate(zip(allocs, got)):
                    name = al.method if al.method != "uniform" else f"uniform W{al.bits[next(iter(al.bits))]}"
                    rows.append({"model": label, "a_bits": a, "budget": budget, "allocation": name, "draw": i,
                                 "average_bits": al.average_bits, "predicted_increase": al.predicted,
                                 "predicted_stderr": al.predicted_stderr, "accuracy": r["accuracy"], "loss": r["loss"],
                                 "fp_accuracy": fp["accuracy"], "fp_loss": fp["loss"],
                                 "measured_increase": r["loss"] - fp["loss"],
                                 "allocation_s": sens_s + solve_s if al.method == "curvature" else math.nan})
                    allocations.append({"model": label, "a_bits": a, "budget": budget, "allocation": name,
                                        "bits": al.bits})
                write_csv(out / "rows.csv", rows)
    write_json(out / "allocations.json", allocations)
    write_json(out / "run.json", run_metadata(vars(args)))
    atomic_write_text(out / "mixed_precision.md", markdown(rows, args))
    print((out / "mixed_precision.md").read_text())


def markdown(rows: list[dict[str, Any]], args: Any) -> str:
    lines = ["Mixed precision at the same average weight bits (activations at the stated width, MSE observer, "
             f"{args.n_calib} calibration images): accuracy (%) and loss. `random`: mean ± std over "
             f"{args.random} random allocations through the same solver. Uniform widths bracket a fractional budget "
             "(they use more or fewer bits than it).", "",
             "| model | A bits | budget | allocation | avg bits | predicted increase | accuracy | loss | allocation time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["a_bits"], r["budget"], r["allocation"]), []).append(r)
    for (model, a, budget, name), rs in groups.items():
        acc = stats.mean_interval([r["accuracy"] for r in rs])
        loss = stats.mean_interval([r["loss"] for r in rs])
        t = rs[0]["allocation_s"]
        lines.append(f"| {model} | {a} | {budget:g} | {name} | {sum(r['average_bits'] for r in rs) / len(rs):.2f} | "
                     f"{sum(r['predicted_increase'] for r in rs) / len(rs):.4f} | {_pm(acc, 2)} | {_pm(loss, 4)} | "
                     f"{'-' if math.isnan(t) else f'{t:.1f}'} |")
    rho = stats.spearman_interval([r["predicted_increase"] for r in rows], [r["measured_increase"] for r in rows])
    lines += ["", f"Spearman's ρ between predicted and measured loss increase over all {rho['n']} allocations: "
              + (f"{rho['rho']:.2f} [{rho['ci_low']:.2f}, {rho['ci_high']:.2f}]" if not math.isnan(rho["rho"])
                 else rho["note"]) + ".", ""]
    return "\n".join(lines)


def _pm(m: dict[str, float], digits: int) -> str:
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}" if m["n"] > 1 else f"{m['mean']:.{digits}f}"


if __name__ == "__main__":
    main()
