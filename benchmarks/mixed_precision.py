"""Curvature-guided mixed precision against its baselines at the same budget.

For each checkpoint (e.g. a plain and a dnq fine-tune of the same zoo parent) and each average
weight-bit budget and activation width: the curvature allocation (``workbench.ptq.allocate_bits``),
the uniform widths that bracket the budget, ``--random`` random allocations through the same
exact solver, and the error-norm proxy (no curvature). Each is quantized (MSE observer) and
evaluated; the table gives accuracy and loss, the allocation time, and Spearman's rho between
predicted and measured loss increase over every allocation tried (with its interval).

With ``--a-budgets`` it measures per-layer activation widths instead: the weights take the
curvature allocation at each weight budget, and the inputs of the Linear/Conv layers get widths
from ``--a-candidates`` under an average-activation-bits budget, chosen from the input-side
curvature (``activation_sensitivities``), uniformly, or at random through the same solver. Those
results go to ``activations.md`` / ``activation_rows.csv`` beside the weight results.

    python benchmarks/mixed_precision.py CKPT [CKPT ...] --out docs/results/mixed_precision
    python benchmarks/mixed_precision.py CKPT [CKPT ...] --out docs/results/mixed_precision --a-budgets 4,6
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
    Allocation,
    LayerSensitivity,
    activation_sensitivities,
    allocate_bits,
    layer_sensitivities,
    proxy_allocation,
    random_allocation,
    solve,
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
    ap.add_argument("--a-budgets", default="", help="average input bits: measure per-layer activation widths")
    ap.add_argument("--a-candidates", default="8,6,4,3")
    args = ap.parse_args()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    labels = args.labels.split(",") if args.labels else [Path(c).parent.parent.name or Path(c).stem
                                                         for c in args.checkpoints]
    budgets = [float(b) for b in args.budgets.split(",")]
    abits = [int(a) for a in args.abits.split(",")]
    if args.a_budgets:
        return activation_main(args, out, labels, budgets)
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
    intro = ("Mixed precision at the same average weight bits (activations at the stated width, MSE observer, "
             f"{args.n_calib} calibration images): accuracy (%) and loss. `random`: mean ± std over "
             f"{args.random} random allocations through the same solver. Uniform widths bracket a fractional budget "
             "(they use more or fewer bits than it).")
    return table_markdown(rows, intro, [("model", "model", "{}"), ("a_bits", "A bits", "{}"),
                                        ("budget", "budget", "{:g}")], ("average_bits", "avg bits"))


def table_markdown(rows: list[dict[str, Any]], intro: str, keys: list[tuple[str, str, str]],
                   average: tuple[str, str]) -> str:
    """One line per group of ``keys`` and allocation: the mean width, prediction, accuracy and
    loss (mean ± std over draws), then Spearman's rho of predicted against measured increase."""
    lines = [intro, "", "| " + " | ".join(h for _, h, _ in keys) + f" | allocation | {average[1]} | predicted increase "
             "| accuracy | loss | allocation time (s) |", "|---" * (len(keys) + 6) + "|"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*(r[k] for k, _, _ in keys), r["allocation"]), []).append(r)
    for key, rs in groups.items():
        acc = stats.mean_interval([r["accuracy"] for r in rs])
        loss = stats.mean_interval([r["loss"] for r in rs])
        t = rs[0]["allocation_s"]
        cells = [f.format(v) for (_, _, f), v in zip(keys, key)]
        lines.append(f"| {' | '.join(cells)} | {key[-1]} | {sum(r[average[0]] for r in rs) / len(rs):.2f} | "
                     f"{sum(r['predicted_increase'] for r in rs) / len(rs):.4f} | {_pm(acc, 2)} | {_pm(loss, 4)} | "
                     f"{'-' if math.isnan(t) else f'{t:.1f}'} |")
    rho = stats.spearman_interval([r["predicted_increase"] for r in rows], [r["measured_increase"] for r in rows])
    lines += ["", f"Spearman's ρ between predicted and measured loss increase over all {rho['n']} allocations: "
              + (f"{rho['rho']:.2f} [{rho['ci_low']:.2f}, {rho['ci_high']:.2f}]" if not math.isnan(rho["rho"])
                 else rho["note"]) + ".", ""]
    return "\n".join(lines)


def _with_inputs(alloc: Allocation, a_sens: list[LayerSensitivity], a_bits: list[int], method: str) -> dict[str, Any]:
    """The weight allocation with these input widths: its PTQConfig fields and prediction (the
    weights' part of ``alloc``, whose own total already holds its curvature-chosen inputs)."""
    a_map = {s.name: int(b) for s, b in zip(a_sens, a_bits)}
    elements = sum(s.params for s in a_sens)
    predicted_a = sum(s.predicted(b) for s, b in zip(a_sens, a_bits))
    return {"method": method, "layer_a_bits": a_map,
            "average_a_bits": sum(s.params * b for s, b in zip(a_sens, a_bits)) / elements,
            "predicted_a": predicted_a, "predicted": sum(r["predicted"] for r in alloc.layers) + predicted_a}


def activation_main(args: Any, out: Path, labels: list[str], budgets: list[float]) -> None:
    """Per-layer activation widths: curvature, uniform and random inputs under the same budget."""
    a_budgets = [float(b) for b in args.a_budgets.split(",")]
    a_cands = sorted(int(b) for b in args.a_candidates.split(","))
    rows: list[dict[str, Any]] = []
    for label, path in zip(labels, args.checkpoints):
        model, method, calib, evals = checkpoint_data(path, args.n_calib, n_eval=args.n_eval)
        fp = sweep([(label, model, method)], [], calib, evals, progress=False)[0]
        t0 = time.perf_counter()
        sens = layer_sensitivities(model, calib[:1], generator=torch.Generator().manual_seed(0))
        w_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        a_sens = activation_sensitivities(model, calib[:1], generator=torch.Generator().manual_seed(0))
        a_s = time.perf_counter() - t0
        for budget in budgets:
            for a_budget in a_budgets:
                t0 = time.perf_counter()
                alloc = allocate_bits(model, budget=budget, candidates=(8, 6, 4, 3, 2), a_candidates=a_cands,
                                      a_budget=a_budget, sensitivities=sens, a_sensitivities=a_sens)
                solve_s = time.perf_counter() - t0
                choices = [_with_inputs(alloc, a_sens, [alloc.a_layer_bits[s.name] for s in a_sens], "curvature")]
                if float(a_budget).is_integer() and int(a_budget) in a_cands:
                    choices.append(_with_inputs(alloc, a_sens, [int(a_budget)] * len(a_sens), f"uniform A{int(a_budget)}"))
                rng = np.random.default_rng(0)
                for _ in range(args.random):  # random costs through the same solver: the budget used as fully
                    costs = [{b: float(rng.random()) * ((2 ** a_cands[0] - 1) / (2**b - 1)) ** 2 for b in a_cands}
                             for _ in a_sens]
                    res = [{b: s.params * b for b in a_cands} for s in a_sens]
                    picked, _ = solve(costs, res, a_budget * sum(s.params for s in a_sens))
                    choices.append(_with_inputs(alloc, a_sens, picked, "random"))
                configs = [alloc.config(observer="mse", n_calib=args.n_calib, a_bits=int(round(a_budget)),  # attention alike
                                        layer_a_bits=c["layer_a_bits"]) for c in choices]
                got = sweep([(label, model, method)], configs, calib, evals, include_fp=False, progress=False)
                for i, (c, r) in enumerate(zip(choices, got)):
                    rows.append({"model": label, "budget": budget, "a_budget": a_budget, "allocation": c["method"],
                                 "draw": i, "average_bits": alloc.average_bits, "average_a_bits": c["average_a_bits"],
                                 "predicted_increase": c["predicted"], "predicted_a": c["predicted_a"],
                                 "accuracy": r["accuracy"], "loss": r["loss"], "fp_accuracy": fp["accuracy"],
                                 "fp_loss": fp["loss"], "measured_increase": r["loss"] - fp["loss"],
                                 "allocation_s": w_s + a_s + solve_s if c["method"] == "curvature" else math.nan,
                                 "a_bits_per_layer": " ".join(str(c["layer_a_bits"][s.name]) for s in a_sens)})
                write_csv(out / "activation_rows.csv", rows)
    write_json(out / "run_activations.json", run_metadata(vars(args)))
    atomic_write_text(out / "activations.md", activation_markdown(rows, args))
    print((out / "activations.md").read_text())


def activation_markdown(rows: list[dict[str, Any]], args: Any) -> str:
    intro = ("Per-layer activation widths (inputs of every Linear/Conv; the attention matmuls at the width rounded "
             "from the budget, for every allocation alike) at the same average input bits, with the weights at "
             f"their curvature allocation; MSE observer, {args.n_calib} calibration images. `random`: mean ± std "
             f"over {args.random} random input allocations through the same solver.")
    return table_markdown(rows, intro, [("model", "model", "{}"), ("budget", "W budget", "{:g}"),
                                        ("a_budget", "A budget", "{:g}")], ("average_a_bits", "avg A bits"))


def _pm(m: dict[str, float], digits: int) -> str:
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}" if m["n"] > 1 else f"{m['mean']:.{digits}f}"


if __name__ == "__main__":
    main()
