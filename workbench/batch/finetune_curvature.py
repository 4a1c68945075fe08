"""The curvature side of the fine-tune report: per arm means, rank correlations of each measure
with the damage, and each measure paired against the control, from ``curvature.csv`` rows."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .. import stats, tables


def fmt(v: Any, digits: int = 2, sign: bool = False) -> str:
    """The report's numbers: :func:`workbench.tables.fmt` with fixed decimals, so that a column of
    differences and intervals reads aligned."""
    return tables.fmt(v, digits, sign=sign, fixed=True)


def diff_cell(r: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not r or "diff_mean" not in r:
        return "-"
    if r["n_pairs"] < 2:
        return f"{fmt(r['diff_mean'], digits, sign=True)} (1 pair)"
    mark = {"better": " ▲", "worse": " ▼"}.get(r["verdict"], "")
    return (f"{fmt(r['diff_mean'], digits, sign=True)} [{fmt(r['diff_ci_low'], digits, sign=True)}, "
            f"{fmt(r['diff_ci_high'], digits, sign=True)}]{mark}")


def curvature_summary(curv: Sequence[Mapping[str, Any]], ptq_means: Sequence[Mapping[str, Any]]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per arm the mean curvature measures, and the Spearman correlation (with its interval) of
    each measure with the measured damage over all members: the weight-only RTN loss increase
    of the curvature report, and the accuracy lost at the same bits under PTQ (MSE)."""
    from .finetune_study import CURVATURE_MEASURES

    measures = list(CURVATURE_MEASURES)
    per_arm = []
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in curv:
        groups[(r["family"], r["epochs"], r["arm"], r["w_bits"])].append(r)
    for (fam, ep, arm, b), rs in groups.items():
        row = {"family": fam, "epochs": ep, "arm": arm, "w_bits": b, "members": len(rs)}
        for m in (*measures, "measured_increase", "first_order"):
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals else math.nan
        per_arm.append(row)
    fp = {(r["family"], r["epochs"], r["replicate"], r["arm"]): r["accuracy"] for r in ptq_means
          if r["setting"] == "FP32"}
    q = {(r["family"], r["epochs"], r["replicate"], r["arm"], r["setting"]): r["accuracy"] for r in ptq_means}
    rho = []
    for (fam, ep, b) in sorted({(r["family"], r["epochs"], r["w_bits"]) for r in curv}):
        rs = [r for r in curv if (r["family"], r["epochs"], r["w_bits"]) == (fam, ep, b)]
        setting = f"W{b}A{b}/mse"
        drops = [fp.get((fam, ep, r["replicate"], r["arm"]), math.nan)
                 - q.get((fam, ep, r["replicate"], r["arm"], setting), math.nan) for r in rs]
        for m in measures:
            xs = [float(r[m]) for r in rs]
            for target, ys in (("measured_increase", [float(r["measured_increase"]) for r in rs]),
                               (f"{setting} accuracy drop", drops)):
                s = stats.spearman_interval(xs, ys)
                rho.append({"family": fam, "epochs": ep, "w_bits": b, "measure": m, "damage": target, **s})
    return per_arm, rho


#: The curvature measures paired against the control, with the digits they are printed with.
PAIRED_CURVATURE = {"trace": 0, "top_eigenvalue": 1, "sigma_trace": 4, "measured_increase": 4}


def curvature_paired(curv: Sequence[Mapping[str, Any]], control: str = "plain", confidence: float = 0.95
                     ) -> list[dict[str, Any]]:
    """Per family, budget, weight bits and measure: each arm's paired difference to ``control``
    (same parent and seed) with its t interval. The trace and the top eigenvalue do not depend on
    the bits; they are reported once, under the largest ``w_bits``."""
    if not curv:
        return []
    top = max(int(r["w_bits"]) for r in curv)
    long = []
    for r in curv:
        for m in PAIRED_CURVATURE:
            if m in ("trace", "top_eigenvalue") and int(r["w_bits"]) != top:
                continue
            v = r.get(m)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            long.append({"family": r["family"], "epochs": float(r["epochs"]), "w_bits": int(r["w_bits"]),
                         "measure": m, "arm": r["arm"], "replicate": r["replicate"], "value": float(v)})
    return stats.paired_summary(long, value="value", arm="arm", pair="replicate",
                                by=("family", "epochs", "w_bits", "measure"), control=control,
                                confidence=confidence, interval="t")


def curvature_paired_markdown(rows: Sequence[Mapping[str, Any]], control: str) -> str:
    rows = [r for r in rows if "diff_mean" in r]
    if not rows:
        return ""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    names = {"trace": "trace", "top_eigenvalue": "top eigenvalue", "sigma_trace": "σ-weighted trace",
             "measured_increase": "measured loss increase (RTN weights)"}
    lines = ["", f"### Curvature, paired against `{control}`", "",
             f"Arm minus `{control}` of the same parent and seed, [95 % t interval] over the replicates; ▼/▲ where "
             "the interval excludes 0 (▼: lower than the control, flatter). The trace and the top eigenvalue do not "
             "depend on the bits.", "",
             "| family | W bits | measure | " + " | ".join(f"`{a}` - `{control}`" for a in arms) + " |",
             "|---|---|---|" + "---|" * len(arms)]
    cell = {(r["family"], r["epochs"], r["w_bits"], r["measure"], r["arm"]): r for r in rows}
    order = list(PAIRED_CURVATURE)
    for key in sorted({(r["family"], r["epochs"], r["w_bits"], r["measure"]) for r in rows},
                      key=lambda k: (k[0], k[1], k[3] not in ("trace", "top_eigenvalue"), -k[2], order.index(k[3]))):
        bits = "-" if key[3] in ("trace", "top_eigenvalue") else str(key[2])
        lines.append(f"| {key[0]} | {bits} | {names[key[3]]} | " + " | ".join(
            diff_cell(cell.get((*key, a)), PAIRED_CURVATURE[key[3]]) for a in arms) + " |")
    return "\n".join(lines) + "\n"
