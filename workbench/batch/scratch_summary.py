"""The from-scratch study's numbers: mean ± std per (model, method, config), paired differences
to the reference method, and rank correlations of curvature with damage."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .scratch_member import DEFAULT_BITS

# ---------------------------------------------------------------------------------------
# aggregating


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def config_order(labels: Iterable[str]) -> list[str]:
    pref = ["plain", "wnoise", "anoise", "dnq", "uniform", "sam", "swa"]
    labels = list(dict.fromkeys(labels))
    return sorted(labels, key=lambda x: (pref.index(x) if x in pref else len(pref), x))


def summarize(got: Mapping[str, list[dict[str, Any]]], bits: Sequence[str] = DEFAULT_BITS) -> dict[str, Any]:
    """Mean ± std over seeds: one row per (model, label) for FP, each PTQ setting (min-max and the
    other observers, with and without attention matmuls), curvature and cost."""
    members, ptq = got["members"], got["ptq"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for m in members:
        groups[(m["model"], m["label"])].append(m)
    rows = []
    for model in dict.fromkeys(m["model"] for m in members):
        labels = config_order(lbl for (mod, lbl) in groups if mod == model)
        sam_time = mean_sd(m["epoch_time_s"] for m in groups.get((model, "sam"), []))[0]
        plain_time = mean_sd(m["epoch_time_s"] for m in groups.get((model, "plain"), []))[0]
        for label in labels:
            ms = groups[(model, label)]
            jobs = {m["job"] for m in ms}
            row: dict[str, Any] = {"model": model, "label": label, "method": ms[0]["method"], "seeds": len(ms)}
            for key in ("fp_accuracy", "epoch_time_s", "trace", "top_eigenvalue", "sigma_trace_w4",
                        "predicted_increase_w4", "measured_increase_w4", "predicted_increase_w3",
                        "measured_increase_w3"):
                mean, std, _ = mean_sd(m.get(key) for m in ms)
                row[key], row[f"{key}_std"] = mean, std
            row["time_vs_plain"] = row["epoch_time_s"] / plain_time if plain_time else math.nan
            row["time_vs_sam"] = row["epoch_time_s"] / sam_time if sam_time else math.nan
            for obs in dict.fromkeys(r.get("observer") for r in ptq if r.get("observer")):
                for att in (True, False):
                    for b in bits:
                        sel = [r for r in ptq if r["job"] in jobs and r["config"] == b and r.get("observer") == obs
                               and bool(r.get("quant_attn")) == att]
                        if not sel:
                            continue
                        tag = f"{b}_{obs}" + ("" if att else "_noattn")
                        for key in ("accuracy", "drop"):
                            mean, std, _ = mean_sd(r[key] for r in sel)
                            row[f"{tag}_{key}"], row[f"{tag}_{key}_std"] = mean, std
                        row[f"{tag}_values"] = [r["accuracy"] for r in sel]
            rows.append(row)
    return {"rows": rows}


def spearman_table(got: Mapping[str, list[dict[str, Any]]], config: str = "W4A4") -> list[dict[str, Any]]:
    """Rank correlation (per model family, over members) of each curvature measure with the measured
    damage: the weight-only loss increase at W4/W3 and the accuracy drop at ``config`` (min-max)."""
    from ..stats import MIN_RANK_POINTS, spearman

    out = []
    drop = {r["job"]: r["drop"] for r in got["ptq"] if r["config"] == config and r.get("observer") == "minmax"
            and r.get("quant_attn") in (True, None)}
    for model in dict.fromkeys(m["model"] for m in got["members"]):
        ms = [m for m in got["members"] if m["model"] == model]
        for target, ys in (("measured_increase_w4", [m.get("measured_increase_w4") for m in ms]),
                           ("measured_increase_w3", [m.get("measured_increase_w3") for m in ms]),
                           (f"{config}_drop", [drop.get(m["job"], math.nan) for m in ms])):
            ys = [math.nan if y is None else float(y) for y in ys]
            row = {"model": model, "damage": target, "members": len(ms)}
            for measure in ("top_eigenvalue", "trace", "sigma_trace_w4", "predicted_increase_w4",
                            "predicted_increase_w3", "sharpness_ascent"):
                xs = [math.nan if m.get(measure) is None else float(m[measure]) for m in ms]
                valid = sum(not (math.isnan(x) or math.isnan(y)) for x, y in zip(xs, ys))
                # over fewer than 5 members a rank correlation is +-1 or nearly so by chance: none is printed
                row[measure] = spearman(xs, ys) if valid >= MIN_RANK_POINTS else math.nan
            out.append(row)
    return out


def effect_cells(e: Mapping[str, Any]) -> dict[str, Any]:
    """A paired effect with its difference and interval as table text (no interval for one pair)."""
    ci = "-" if e["n_pairs"] < 2 else f"[{e['diff_ci_low']:+.2f}, {e['diff_ci_high']:+.2f}]"
    return {**e, "diff": f"{e['diff_mean']:+.2f}", "ci": ci}


def paired_effects(got: Mapping[str, list[dict[str, Any]]], model: str, bits: Sequence[str] = ("W4A4", "W3A3"),
                   observer: str = "minmax") -> list[dict[str, Any]]:
    """Each method against ``plain`` of the same seed (replacing the project's old pass/fail
    targets): the paired accuracy difference at FP and ``bits`` (``observer``, attention matmuls
    quantized) with its 95 % t interval and verdict (:func:`workbench.stats.paired_summary`)."""
    from ..stats import paired_summary

    members = {m["job"]: m for m in got["members"] if m["model"] == model}
    rows = []
    for r in got["ptq"]:
        m = members.get(r["job"])
        if m is None:
            continue
        if r["config"] == "FP32" or (r["config"] in bits and r.get("observer") == observer
                                     and bool(r.get("quant_attn", True))):
            rows.append({"arm": m["label"], "seed": m["seed"], "config": r["config"], "accuracy": r["accuracy"]})
    out = [r for r in paired_summary(rows, by=("config",)) if "diff_mean" in r]
    order = {c: i for i, c in enumerate(("FP32", *bits))}
    labels = config_order(r["arm"] for r in out)
    return sorted(out, key=lambda r: (order.get(r["config"], 99), labels.index(r["arm"])))
