"""The fine-tune protocol's report: paired differences with intervals, figures, Markdown.

Everything here reads the tidy tables that :func:`workbench.batch.finetune_study.collect`
writes (``ptq.csv``, ``members.csv``, ``curvature.csv``, ``search.csv``), so the report, its
CSVs and the "does it work?" notebook are generated from the same data.

How the numbers are made:

* A member's accuracy under a PTQ setting is the mean over its calibration draws. The spread
  over draws is reported on its own (:func:`calibration_spread`), next to the spread over
  replicates, so the two sources of variance are not mixed.
* Each arm is compared with the control of the same replicate (parent and fine-tune seed): the
  mean paired difference with its 95 % Student-t interval over the replicates, and the
  percentile-bootstrap interval beside it. An interval that contains 0 is "not distinguishable".
* Rank correlations of curvature with damage come with a Fisher-z interval and are refused
  below 5 models (:func:`workbench.stats.spearman_interval`).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import stats
from ..errors import ConfigError
from ..runinfo import atomic_write_text, git_commit, write_csv, write_json
from .finetune_curvature import curvature_paired, curvature_paired_markdown, curvature_summary, diff_cell, fmt
from .protocol import family_epochs

#: Markers of the generated block in a Markdown file (docs/results.md).
BEGIN, END = "<!-- finetune:begin -->", "<!-- finetune:end -->"
NUMERIC = ("accuracy", "loss", "calib_time_s", "eval_time_s", "test_accuracy", "val_accuracy", "qat_own_accuracy",
           "train_seconds", "last_call_seconds", "work_seconds", "trace", "top_eigenvalue", "sigma_trace", "predicted_increase",
           "predicted_stderr", "first_order", "measured_increase", "acc_drop", "trace_stderr", "epochs", "value",
           "val_fp_accuracy", "control_val_fp_accuracy", "seconds")


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """A tidy CSV with its numbers as floats (empty cells: None)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in NUMERIC or k.startswith("val_") or k.startswith("control_val_"):
                r[k] = float(v) if v not in ("", None) else None
            elif k in ("seed", "draw", "w_bits") and v not in ("", None):
                r[k] = int(float(v))
    return rows


def load_tables(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    folder = Path(folder)
    tables = {name: read_table(folder / f"{name}.csv") for name in ("members", "ptq", "curvature", "search")}
    if not tables["members"]:
        raise ConfigError(f"{folder} has no members.csv: run the protocol (workbench study finetune) first")
    return tables


# ----------------------------------------------------------------------------- statistics


def draw_means(ptq: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per member and setting: the accuracy and loss averaged over calibration draws."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in ptq:
        if r.get("accuracy") is None or math.isnan(float(r["accuracy"])):
            continue  # not applicable (recorded with a note), never a zero
        groups[(r["family"], float(r["epochs"]), r["replicate"], r["arm"], r["setting"])].append(r)
    out = []
    for (fam, ep, rep, arm, setting), rs in groups.items():
        first = rs[0]
        out.append({"family": fam, "epochs": ep, "replicate": rep, "arm": arm, "setting": setting,
                    "bits": first["bits"], "column": first["column"], "draws": len(rs),
                    "accuracy": sum(float(r["accuracy"]) for r in rs) / len(rs),
                    "loss": sum(float(r["loss"]) for r in rs) / len(rs)})
    return out


def paired_table(ptq: Sequence[Mapping[str, Any]], control: str = "plain", confidence: float = 0.95
                 ) -> list[dict[str, Any]]:
    """Per family, budget, setting and arm: mean accuracy over replicates and the paired
    difference to ``control`` with its t interval (``diff_ci_*``) and bootstrap interval
    (``boot_ci_*``)."""
    rows = draw_means(ptq)
    by = ("family", "epochs", "setting")
    t = stats.paired_summary(rows, value="accuracy", arm="arm", pair="replicate", by=by, control=control,
                             confidence=confidence, interval="t")
    boot = {tuple(r[k] for k in (*by, "arm")): r for r in stats.paired_summary(
        rows, value="accuracy", arm="arm", pair="replicate", by=by, control=control, confidence=confidence,
        interval="bootstrap")}
    meta = {(r["family"], r["epochs"], r["setting"]): (r["bits"], r["column"], r["draws"]) for r in rows}
    out = []
    for r in t:
        b = boot[tuple(r[k] for k in (*by, "arm"))]
        bits, column, draws = meta[(r["family"], r["epochs"], r["setting"])]
        row = {**r, "bits": bits, "column": column, "draws": draws}
        if "diff_mean" in r:
            row.update(diff_half_width=(r["diff_ci_high"] - r["diff_ci_low"]) / 2 if r["n_pairs"] > 1 else math.nan,
                       boot_ci_low=b["diff_ci_low"], boot_ci_high=b["diff_ci_high"])
        out.append(row)
    return out


def calibration_spread(ptq: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per family, budget, setting and arm with several draws: the mean over members of the
    standard deviation across calibration draws, beside the standard deviation across replicates
    of the draw-averaged accuracy."""
    draws: dict[tuple, list[float]] = defaultdict(list)
    for r in ptq:
        if r.get("accuracy") is not None and not math.isnan(float(r["accuracy"])):
            draws[(r["family"], float(r["epochs"]), r["setting"], r["arm"], r["replicate"])].append(float(r["accuracy"]))
    within: dict[tuple, list[float]] = defaultdict(list)
    means: dict[tuple, list[float]] = defaultdict(list)
    for (fam, ep, setting, arm, _rep), accs in draws.items():
        if len(accs) < 2:
            continue
        within[(fam, ep, setting, arm)].append(stats.mean_interval(accs)["std"])
        means[(fam, ep, setting, arm)].append(sum(accs) / len(accs))
    out = []
    for key, stds in within.items():
        reps = means[key]
        out.append({"family": key[0], "epochs": key[1], "setting": key[2], "arm": key[3], "members": len(stds),
                    "calibration_std": sum(stds) / len(stds),
                    "replicate_std": stats.mean_interval(reps)["std"] if len(reps) > 1 else math.nan})
    return out


# ----------------------------------------------------------------------------- figures


#: The parts of a member's work, in the order a member does them; PTQ rows are named by their
#: method (:attr:`workbench.ptq.engine.PTQConfig.method`), any other method by itself.
COMPUTE_PARTS = {"rtn": "round-to-nearest PTQ", "rtn+bc": "bias correction", "repq+rtn": "RepQ",
                 "adaround": "AdaRound", "brecq": "BRECQ", "qdrop": "BRECQ+QDrop"}


def compute_by_part(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Where the members' work went, per family and over all (``family == "all"``): seconds of
    fine-tuning, of each PTQ method (calibration and evaluation of every setting, draw and bit
    width) and of curvature, from the tidy tables of finished members. What a protocol would save
    by dropping a part, on the machine that ran it.

    A member's curvature report covers all its weight bit widths at once, and ``curvature.csv``
    repeats its seconds on each bit width's row: it is counted once per member.
    """
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    for m in tables.get("members", []):
        if m.get("status") == "done" and m.get("train_seconds"):
            seconds[(m["family"], "fine-tuning")] += float(m["train_seconds"])
    for r in tables.get("ptq", []):
        spent = sum(float(r.get(k) or 0.0) for k in ("calib_time_s", "eval_time_s"))
        if r.get("ptq_method") and spent > 0:
            seconds[(r["family"], COMPUTE_PARTS.get(r["ptq_method"], r["ptq_method"]))] += spent
    counted = set()
    for r in tables.get("curvature", []):
        key = (r["family"], r["replicate"], r["arm"], r["epochs"])
        if key not in counted and r.get("seconds") not in (None, ""):
            counted.add(key)
            seconds[(r["family"], "curvature")] += float(r["seconds"])
    order = ["fine-tuning", *dict.fromkeys(COMPUTE_PARTS.values()), "curvature"]
    rank = {p: i for i, p in enumerate(order)}
    families = sorted({f for f, _ in seconds})
    rows = []
    for fam in [*families, "all"]:
        parts = defaultdict(float)
        for (f, part), sec in seconds.items():
            if fam in ("all", f):
                parts[part] += sec
        rows += [{"family": fam, "part": part, "seconds": sec}
                 for part, sec in sorted(parts.items(), key=lambda kv: (rank.get(kv[0], len(order)), kv[0]))]
    return rows


def paired_figure(paired: Sequence[Mapping[str, Any]], family: str, epochs: float) -> Any:
    """Paired difference to the control (points) with its 95 % t interval, per PTQ setting and arm."""
    import plotly.graph_objects as go

    from ..plots import method_color

    rows = [r for r in paired if r["family"] == family and r["epochs"] == epochs and "diff_mean" in r]
    settings = list(dict.fromkeys(r["setting"] for r in sorted(rows, key=_setting_order)))
    fig = go.Figure()
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = {r["setting"]: r for r in rows if r["arm"] == arm}
        ys = [rs[s]["diff_mean"] if s in rs else None for s in settings]
        hi = [rs[s]["diff_ci_high"] - rs[s]["diff_mean"] if s in rs else None for s in settings]
        lo = [rs[s]["diff_mean"] - rs[s]["diff_ci_low"] if s in rs else None for s in settings]
        fig.add_trace(go.Scatter(x=settings, y=ys, mode="markers", name=f"{arm} - control",
                                 marker={"size": 9, "color": method_color(arm)},
                                 error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo}))
    fig.add_hline(y=0, line_dash="dash", line_color="gray")
    n = max((r["n_pairs"] for r in rows), default=0)
    fig.update_layout(title=f"{family}, {epochs:g}-epoch fine-tunes: paired difference to the plain fine-tune "
                            f"(mean, 95 % t interval over {n} replicates)",
                      xaxis_title="PTQ setting", yaxis_title="accuracy difference (points)", template="plotly_white",
                      scattermode="group")
    return fig


def accuracy_figure(paired: Sequence[Mapping[str, Any]], family: str, epochs: float, column: str = "mse") -> Any:
    """Mean test accuracy (± std over replicates) against the bit setting, per arm."""
    import plotly.graph_objects as go

    from ..plots import method_color

    rows = [r for r in paired if r["family"] == family and r["epochs"] == epochs
            and (r["setting"] == "FP32" or r["column"] == column)]
    xs = list(dict.fromkeys(r["bits"] for r in sorted(rows, key=_setting_order)))
    fig = go.Figure()
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = {r["bits"]: r for r in rows if r["arm"] == arm}
        fig.add_trace(go.Scatter(x=xs, y=[rs[x]["mean"] if x in rs else None for x in xs], mode="lines+markers",
                                 name=arm, line={"color": method_color(arm)}, connectgaps=True,  # arms off the wide grid
                                 error_y={"type": "data", "array": [rs[x]["std"] if x in rs else None for x in xs]}))
    fig.update_layout(title=f"{family}: test accuracy after PTQ ({column}, mean ± std over replicates)",
                      xaxis_title="setting", yaxis_title="accuracy (%)", template="plotly_white")
    return fig


def prediction_figure(curv: Sequence[Mapping[str, Any]], family: str) -> Any:
    """Predicted (½ Σ σ² H_ii) against measured weight-quantization loss increase, per member."""
    import plotly.graph_objects as go

    from ..plots import method_color

    rows = [r for r in curv if r["family"] == family]
    fig = go.Figure()
    for (arm, b) in dict.fromkeys((r["arm"], r["w_bits"]) for r in rows):
        rs = [r for r in rows if r["arm"] == arm and r["w_bits"] == b]
        fig.add_trace(go.Scatter(x=[r["predicted_increase"] for r in rs], y=[r["measured_increase"] for r in rs],
                                 mode="markers", name=f"{arm} W{b}",
                                 marker={"color": method_color(arm), "symbol": "circle" if b == 4 else "diamond",
                                         "size": 9},
                                 error_x={"type": "data", "array": [r["predicted_stderr"] for r in rs]},
                                 text=[r["replicate"] for r in rs]))
    vals = [v for r in rows for v in (r["predicted_increase"], r["measured_increase"]) if v and v > 0]
    if vals:
        fig.add_trace(go.Scatter(x=[min(vals), max(vals)], y=[min(vals), max(vals)], mode="lines",
                                 name="predicted = measured", line={"dash": "dash", "color": "gray"}))
    fig.update_layout(title=f"{family}: predicted vs measured loss increase of round-to-nearest weights",
                      xaxis_title="predicted ½ Σ σ² H_ii", yaxis_title="measured", xaxis_type="log",
                      yaxis_type="log", template="plotly_white")
    return fig


#: Column order within a bit setting: the observers from weak to strong, then the strong methods.
COLUMN_ORDER = {"minmax": 0, "percentile": 1, "mse": 2, "mse float-attn": 3}


def _setting_order(r: Mapping[str, Any]) -> tuple:
    bits = r["bits"] if "bits" in r else r["setting"].split("/")[0]
    if bits == "FP32":
        return (0, 0, 0, 0, r["setting"])
    if bits == "own":
        return (3, 0, 0, 0, r["setting"])
    from ..quant import parse_bits_pair

    w, a = parse_bits_pair(bits)
    column = r.get("column") or r["setting"].split("/", 1)[-1].replace("/", " ")
    return (1, -(w or 32), -(a or 32), COLUMN_ORDER.get(column, len(COLUMN_ORDER)), r["setting"])


# ----------------------------------------------------------------------------- Markdown


def markdown(tables: Mapping[str, list[dict[str, Any]]], paired: Sequence[Mapping[str, Any]],
             calib: Sequence[Mapping[str, Any]], curv_arm: Sequence[Mapping[str, Any]],
             rho: Sequence[Mapping[str, Any]], protocol: Mapping[str, Any], *, source: str, commit: str = "",
             links: str = "", compute: Sequence[Mapping[str, Any]] = ()) -> str:
    control = protocol.get("control", "plain")
    members = tables["members"]
    done = [m for m in members if m["status"] == "done"]
    failed = [m for m in members if m["status"] == "failed"]
    missing = [m for m in members if m["status"] not in ("done", "failed")]
    lines = [f"_Generated by `workbench study finetune --report-only` from `{source}` (git commit "
             f"`{commit}`){links}. Do not edit between the markers: regenerate._", ""]
    fams = protocol.get("families", {})
    default_epochs = protocol.get("epochs", [1.0])
    lines.append(f"- protocol `{protocol.get('name')}`: " + "; ".join(
        f"{fam}: parents {', '.join(f'`{p}`' for p in spec['parents'])} x fine-tune seeds {spec['seeds']}"
        + (f", and seeds {spec['extra']['seeds']} for {', '.join(f'`{a}`' for a in spec['extra']['arms'])} only"
           if spec.get("extra") else "")
        + (f"; arms {', '.join(f'`{a}`' for a in spec['arms'])} only" if spec.get("arms") else "")
        + (f"; budget {family_epochs(spec, default_epochs)} epoch(s)" if "epochs" in spec else "")
        + (f"; judged on its first {spec['n_eval']} test images" if spec.get("n_eval") else "")
        for fam, spec in fams.items()))
    lines.append(f"- arms (fine-tunes of the same parent, seed and steps; `{control}` is the control): " + ", ".join(
        f"`{a}` ({', '.join(f'{k}={v}' for k, v in spec.items())})" for a, spec in protocol.get("arms", {}).items()))
    own_budgets = [f"{fam}: {family_epochs(spec, default_epochs)}" for fam, spec in fams.items() if "epochs" in spec]
    lines.append(f"- budgets: {protocol.get('epochs')} epoch(s)" + (f" ({'; '.join(own_budgets)})" if own_budgets
                                                                     else "")
                 + f"; validation split: {protocol.get('val_size')} training "
                 "images held out of every fine-tune (the zoo parents saw them; the test set is never used to choose)")
    lines.append(f"- members: {len(done)} done, {len(failed)} failed, {len(missing)} not run"
                 + (": " + ", ".join(f"{m['replicate']}/{m['arm']} ({m['error'] or m['status']})"
                                     for m in failed + missing) if failed or missing else ""))
    work = [float(m["work_seconds"]) for m in done if m.get("work_seconds")]
    if work:
        lines.append(f"- compute: {sum(work) / 60:.0f} minutes of fine-tuning, PTQ and curvature over the "
                     f"{len(work)} members ({sum(work) / len(work):.0f} s each on one CPU thread; the noise search's "
                     "extra fine-tunes and the members' loading not counted)")
        parts = [r for r in compute if r["family"] == "all"]
        total = sum(r["seconds"] for r in parts)
        if total > 0:
            lines.append("- where it went: " + ", ".join(
                f"{r['part']} {r['seconds'] / 60:.0f} min ({100 * r['seconds'] / total:.0f} %)" for r in parts))
    lines.append("")
    search = tables.get("search") or []
    if search:
        crit = (protocol.get("search") or {})
        lines += ["### Noise multiplier search (validation split, stated before running)", "",
                  f"Criterion: the highest mean validation accuracy at {crit.get('bits', 'W4A4')}/"
                  f"{crit.get('observer', 'mse')} over {crit.get('replicates', 3)} replicates, among the values "
                  f"whose mean FP validation accuracy is within {crit.get('fp_tolerance', 0.5)} points of "
                  f"`{control}`'s.", ""]
        qcol = next((k for k in search[0] if k.startswith("val_") and k != "val_fp_accuracy"), None)
        ccol = f"control_{qcol}" if qcol else None
        lines += ["| value | replicates | val FP acc | control val FP acc | val quantized acc | control val quantized acc "
                  "| eligible | chosen |", "|---|---|---|---|---|---|---|---|"]
        for c in search:
            lines.append(f"| {fmt(c['value'])} | {c['replicates']} | {fmt(c['val_fp_accuracy'])} | "
                         f"{fmt(c['control_val_fp_accuracy'])} | {fmt(c.get(qcol))} | {fmt(c.get(ccol))} | "
                         f"{c['eligible']} | {'**yes**' if str(c['chosen']) == 'True' else ''} |")
        lines.append("")
    for fam, spec in fams.items():
        for ep in family_epochs(spec, default_epochs):
            ep = float(ep)
            rows = [r for r in paired if r["family"] == fam and r["epochs"] == ep]
            if not rows:
                continue
            arms = list(dict.fromkeys(r["arm"] for r in rows))
            own = [r for r in rows if r["bits"] == "own"]  # QAT's own quantizers: no control to pair with
            rows = [r for r in rows if r["bits"] != "own"]
            settings = sorted({r["setting"]: r for r in rows}.values(), key=_setting_order)
            lines += [f"### {fam}, {ep:g}-epoch fine-tunes: paired differences to `{control}`", "",
                      "Accuracy difference in points, arm minus control of the same parent and seed; "
                      "[95 % t interval] over the replicates; ▲/▼ where the interval excludes 0. Each value is the "
                      "mean over the calibration draws (column `draws`). Intervals are not corrected for the "
                      "many cells.", "",
                      f"| setting | draws | `{control}` mean ± std | " + " | ".join(
                          f"`{a}` - `{control}` ({_pairs(rows, a)} pairs)" for a in arms if a != control) + " |",
                      "|---|---|---|" + "---|" * (len(arms) - 1)]
            cell = {(r["setting"], r["arm"]): r for r in rows}
            for s in settings:
                c = cell.get((s["setting"], control))
                lines.append(f"| {s['setting']} | {s['draws']} | "
                             f"{fmt(c['mean']) + ' ± ' + fmt(c['std']) if c else '-'} | "
                             + " | ".join(diff_cell(cell.get((s["setting"], a))) for a in arms if a != control)
                             + " |")
            if own:
                lines.append("")
            for r in own:
                lines.append(f"`{r['arm']}` with its own learned quantizers (LSQ, attention matmuls in float): "
                             f"{fmt(r['mean'])} ± {fmt(r['std'])} over {r['n']} replicates.")
            n = max((r.get("n_pairs", 0) for r in rows), default=0)
            widths = [r["diff_half_width"] for r in rows if r.get("diff_half_width") is not None
                      and not math.isnan(r["diff_half_width"]) and r["bits"] in ("W4A4", "W3A3") and r["column"] == "mse"]
            lines.append("")
            if widths:
                lines.append(f"Replicates per difference: {n}. Half-width of the intervals at W4A4 and W3A3 with "
                             f"MSE: {min(widths):.2f} to {max(widths):.2f} points.")
            better = [f"`{r['arm']}` at {r['setting']} ({fmt(r['diff_mean'], sign=True)})" for r in rows
                      if r.get("verdict") == "better"]
            worse = [f"`{r['arm']}` at {r['setting']} ({fmt(r['diff_mean'], sign=True)})" for r in rows
                     if r.get("verdict") == "worse"]
            lines.append("Distinguishable from the control: " + ("better: " + ", ".join(better) if better else
                                                                 "no arm is better anywhere")
                         + ("; worse: " + ", ".join(worse) if worse else "; none is worse") + ".")
            lines.append("")
    if calib:
        lines += ["### Calibration draws against replicates", "",
                  "Standard deviation of the accuracy (points) across calibration draws of the same member, "
                  "averaged over members, beside the standard deviation across replicates of the draw-averaged "
                  "accuracy.", "", "| family | setting | arm | calibration std | replicate std |", "|---|---|---|---|---|"]
        for r in sorted(calib, key=lambda r: (r["family"], _setting_order(r), r["arm"])):
            lines.append(f"| {r['family']} | {r['setting']} | {r['arm']} | {fmt(r['calibration_std'])} | "
                         f"{fmt(r['replicate_std'])} |")
        lines.append("")
    if curv_arm:
        lines += ["### Curvature of the fine-tuned models", "",
                  "Mean over members of the Hessian trace (deflated Hutchinson), top eigenvalue (Lanczos), the "
                  "σ-weighted trace Σ σᵢ² Hᵢᵢ, the second-order prediction ½ Σ σᵢ² Hᵢᵢ, the first-order term "
                  "gᵀΔ it leaves out, and the measured loss increase of round-to-nearest weights.", "",
                  "| family | arm | W bits | trace | top eigenvalue | σ-weighted trace | predicted | first-order "
                  "| measured |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(curv_arm, key=lambda r: (r["family"], -r["w_bits"], r["arm"])):
            lines.append(f"| {r['family']} | {r['arm']} | {r['w_bits']} | {fmt(r['trace'], 0)} | "
                         f"{fmt(r['top_eigenvalue'], 1)} | {fmt(r['sigma_trace'], 4)} | {fmt(r['predicted_increase'], 4)} "
                         f"| {fmt(r['first_order'], 4, sign=True)} | {fmt(r['measured_increase'], 4)} |")
        lines.append("")
    if rho:
        lines += ["### Does curvature rank the damage?", "",
                  "Spearman's ρ over every fine-tuned model, with a 95 % Fisher-z interval; no ρ is printed "
                  f"over fewer than {stats.MIN_RANK_POINTS} models.", "",
                  "| family | W bits | measure | damage | models | ρ [95 % interval] |", "|---|---|---|---|---|---|"]
        for r in rho:
            cellv = (f"{fmt(r['rho'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if not math.isnan(r["rho"])
                     else r["note"])
            lines.append(f"| {r['family']} | {r['w_bits']} | {r['measure']} | {r['damage']} | {r['n']} | {cellv} |")
        lines.append("")
    return "\n".join(lines)


def replace_block(md_path: str | Path, block: str) -> Path:
    """Put ``block`` between the finetune markers of ``md_path`` (appended with them when absent)."""
    md_path = Path(md_path).expanduser()
    text = md_path.read_text(encoding="utf-8") if md_path.is_file() else ""
    new = f"{BEGIN}\n\n{block.rstrip()}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + new + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + new + "\n"
    atomic_write_text(md_path, text)
    return md_path


def analyze(tables: Mapping[str, list[dict[str, Any]]], protocol: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every statistic of the report from the tidy tables: ``paired``, ``calibration``,
    ``curvature_by_arm`` and ``spearman`` rows."""
    paired = paired_table(tables["ptq"], control=protocol.get("control", "plain"))
    curv_arm, rho = (curvature_summary(tables["curvature"], draw_means(tables["ptq"])) if tables.get("curvature")
                     else ([], []))
    control = protocol.get("control", "plain")
    return {"paired": paired, "calibration": calibration_spread(tables["ptq"]), "curvature_by_arm": curv_arm,
            "spearman": rho, "head_to_head": head_to_head(tables["ptq"], protocol),
            "curvature_paired": curvature_paired(tables.get("curvature") or [], control),
            "compute": compute_by_part(tables)}


def head_to_head(ptq: Sequence[Mapping[str, Any]], protocol: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The searched arm (``dnq``) paired against each other non-control arm (QAT, SAM, ...) of the
    same replicate: does it beat them at equal steps? A protocol without a search compares its
    first arm after the control instead (the one its file names first, as the arm under study)."""
    control = protocol.get("control", "plain")
    arm = (protocol.get("search") or {}).get("arm") or next(
        (a for a in protocol.get("arms", {}) if a != control), None)
    if not arm:
        return []
    out = []
    for other in protocol.get("arms", {}):
        if other in (arm, control):
            continue
        rows = [r for r in ptq if r["arm"] in (arm, other)]
        for r in paired_table(rows, control=other):
            if r["arm"] == arm and "diff_mean" in r:
                out.append({**r, "versus": other})
    return out


def render(tables: Mapping[str, list[dict[str, Any]]], analysis: Mapping[str, list[dict[str, Any]]],
           protocol: Mapping[str, Any], *, source: str, commit: str = "", links: str = "") -> str:
    text = markdown(tables, analysis["paired"], analysis["calibration"], analysis["curvature_by_arm"],
                    analysis["spearman"], protocol, source=source, commit=commit, links=links,
                    compute=analysis.get("compute") or ())
    text = text.rstrip("\n") + "\n" + curvature_paired_markdown(analysis.get("curvature_paired") or [],
                                                             protocol.get("control", "plain"))
    h2h = analysis.get("head_to_head") or []
    if not h2h:
        return text
    arm = h2h[0]["arm"]
    others = list(dict.fromkeys(r["versus"] for r in h2h))
    lines = ["", f"### `{arm}` against the other arms at equal steps", "",
             f"`{arm}` minus each arm of the same parent and seed, [95 % t interval]; ▲/▼ where it excludes 0.", "",
             "| family | epochs | setting | " + " | ".join(f"`{arm}` - `{o}`" for o in others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    cell = {(r["family"], r["epochs"], r["setting"], r["versus"]): r for r in h2h}
    for key in sorted({(r["family"], r["epochs"], r["setting"]): r for r in h2h if r["bits"] != "own"}.values(),
                      key=lambda r: (r["family"], r["epochs"], _setting_order(r))):
        lines.append(f"| {key['family']} | {float(key['epochs']):g} | {key['setting']} | " + " | ".join(
            diff_cell(cell.get((key["family"], key["epochs"], key["setting"], o))) for o in others) + " |")
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def load_report(dest: str | Path) -> dict[str, Any]:
    """A written report folder read back: its tables, protocol, statistics and Markdown, computed
    again from the CSVs (what the "does it work?" notebook shows, and what docs/results.md holds)."""
    import json

    dest = Path(dest).expanduser()
    meta_path = dest / "report.json"
    if not meta_path.is_file():
        raise ConfigError(f"{dest} is not a fine-tune report folder (no report.json); write one with "
                          "`workbench study finetune PROTOCOL --out DIR --report-only`")
    meta = json.loads(meta_path.read_text())
    tables = load_tables(dest)
    analysis = analyze(tables, meta["protocol"])
    text = render(tables, analysis, meta["protocol"], source=meta["source"], commit=meta.get("commit", ""),
                  links=meta.get("links", ""))
    return {"tables": tables, "protocol": meta["protocol"], "analysis": analysis, "markdown": text, "meta": meta}


def rewrite_report(dest: str | Path, *, md: str | Path | None = None) -> dict[str, Path]:
    """Render a written report folder again from its own tables, after the report code changed:
    ``report.md`` and the statistics' CSVs (``paired.csv``, ``compute.csv``, ...) are rewritten,
    the raw tables (members, PTQ, curvature, search) and the figures are left as they are; with
    ``md`` the generated block of that file is replaced too. For a committed report whose member
    folders are gone (``--report-only`` needs them)."""
    dest = Path(dest).expanduser().resolve()
    report = load_report(dest)
    return _write_rendered(dest, report["analysis"].items(), report["markdown"], md)


def _write_rendered(dest: Path, tables: Any, text: str, md: str | Path | None) -> dict[str, Path]:
    """Write ``(name, rows)`` tables as CSVs, ``text`` as ``report.md`` and, with ``md``, into its block."""
    paths: dict[str, Path] = {}
    for name, rows in tables:
        if rows:
            write_csv(dest / f"{name}.csv", rows)
            paths[name] = dest / f"{name}.csv"
    atomic_write_text(dest / "report.md", text)
    paths["report"] = dest / "report.md"
    if md:
        paths["md"] = replace_block(md, text)
    return paths


def _pairs(rows: list[dict[str, Any]], arm: str) -> int:
    """The most pairs any setting of ``arm`` has (a column header: arms on extra seeds have more)."""
    return max((int(r.get("n_pairs") or 0) for r in rows if r["arm"] == arm), default=0)


def write_report(folder: str | Path, *, dest: str | Path | None = None, md: str | Path | None = None,
                 figures: Sequence[str] = ("html", "json")) -> dict[str, Path]:
    """Statistics, figures and Markdown of a protocol folder (into ``dest``, default
    ``FOLDER/report``); with ``md`` the generated block of that file is replaced too. Figures are
    saved as plotly JSON (``plotly.io.read_json``; notebook 08 draws them from the tables) and as
    HTML that loads plotly.js from its CDN, which keeps a committed report small."""
    import json

    from ..plots import save_figure
    from .finetune_study import collect

    folder = Path(folder).expanduser().resolve()
    collect(folder)
    tables = load_tables(folder)
    protocol = json.loads((folder / "protocol.json").read_text())
    dest = Path(dest).expanduser().resolve() if dest else folder / "report"
    dest.mkdir(parents=True, exist_ok=True)
    analysis = analyze(tables, protocol)
    paired = analysis["paired"]
    paths: dict[str, Path] = {}
    for fam, spec in protocol.get("families", {}).items():
        for ep in family_epochs(spec, protocol.get("epochs", [1.0])):
            if any(r["family"] == fam and r["epochs"] == float(ep) for r in paired):
                for name, fig in ((f"paired_{fam}_e{float(ep):g}", paired_figure(paired, fam, float(ep))),
                                  (f"accuracy_{fam}_e{float(ep):g}", accuracy_figure(paired, fam, float(ep)))):
                    paths.update({f"{name}.{k}": v for k, v in save_figure(fig, dest / name, figures,
                                                                           include_plotlyjs="cdn").items()})
        if any(r["family"] == fam for r in tables["curvature"]):
            name = f"prediction_{fam}"
            paths.update({f"{name}.{k}": v for k, v in save_figure(prediction_figure(tables["curvature"], fam),
                                                                   dest / name, figures,
                                                                   include_plotlyjs="cdn").items()})
    rel = _relative(dest, Path(md).expanduser().resolve().parent) if md else None
    links = f"; tables and figures in [`{rel}`]({rel})" if rel else ""
    commit = str(git_commit().get("commit") or "")[:10]
    text = render(tables, analysis, protocol, source=folder.name, commit=commit, links=links)
    write_json(dest / "report.json", {"source": folder.name, "protocol": protocol, "commit": commit, "links": links,
                                      "run": _read_run(folder)})
    raw = ((n, tables[n]) for n in ("members", "ptq", "curvature", "search"))
    return paths | _write_rendered(dest, (*analysis.items(), *raw), text, md)


def _read_run(folder: Path) -> dict[str, Any]:
    import json

    try:
        run = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: run.get(k) for k in ("versions", "git", "time")}


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path, start)).as_posix()


# ----------------------------------------------------------------------------- reading a report


def committed_results() -> Path:
    """The fine-tune study's report folder that ships with the workbench (docs/results/finetune
    in a checkout, its copy inside an installed wheel)."""
    from ..bundled import bundled_dir

    return bundled_dir("results") / "finetune"


def headline_rows(report: Mapping[str, Any], *, arms: Sequence[str] | None = None,
                  bits: Sequence[str] = ("W4A4", "W3A3"), columns: Sequence[str] | None = None
                  ) -> list[dict[str, Any]]:
    """The paired differences to the control at ``bits``, per family, budget, arm and PTQ column
    (all columns unless given), as plain rows for a table."""
    control = report["protocol"].get("control", "plain")
    out = []
    for r in sorted(report["analysis"]["paired"], key=lambda r: (r["family"], r["epochs"], _setting_order(r))):
        if "diff_mean" not in r or r["bits"] not in bits or (arms and r["arm"] not in arms):
            continue
        if columns and r["column"] not in columns:
            continue
        out.append({"family": r["family"], "epochs": r["epochs"], "setting": r["setting"], "arm": r["arm"],
                    "control": control, "pairs": r["n_pairs"], "difference": r["diff_mean"],
                    "ci_low": r["diff_ci_low"], "ci_high": r["diff_ci_high"], "verdict": r["verdict"]})
    return out


def find(report: Mapping[str, Any], **where: Any) -> dict[str, Any]:
    """The one paired-table row matching ``where`` (e.g. ``arm="dnq", setting="W4A4/mse"``).

    Raises:
        ConfigError: no row or several rows match.
    """
    rows = [r for r in report["analysis"]["paired"] if all(r.get(k) == v for k, v in where.items())]
    if len(rows) != 1:
        raise ConfigError(f"{len(rows)} rows match {where}; narrow it down (family, epochs, arm, setting)")
    return rows[0]
