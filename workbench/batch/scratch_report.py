"""The from-scratch study's report: tidy CSVs, plotly figures and the Markdown block spliced into
``docs/results.md`` between ``<!-- study:begin -->`` and ``<!-- study:end -->``."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..runinfo import atomic_write_text, write_csv
from ..tables import markdown_table
from .scratch_collect import collect_study
from .scratch_member import DEFAULT_BITS
from .scratch_summary import config_order, effect_cells, paired_effects, spearman_table, summarize

#: Markers in a Markdown file between which :func:`write_report` puts the generated tables.
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"

# ---------------------------------------------------------------------------------------
# report


def _num(v: float, digits: int | None) -> str:
    if digits is not None:
        return f"{v:.{digits}f}"
    return f"{v:.3g}" if abs(v) < 1 or abs(v) >= 1e4 else f"{v:.4g}"


def _pm_col(rows: Sequence[dict[str, Any]], key: str, digits: int | None = 2) -> list[str]:
    out = []
    for r in rows:
        m, s = r.get(key, math.nan), r.get(f"{key}_std")
        if m is None or (isinstance(m, float) and math.isnan(m)):
            out.append("–")
        elif r.get("seeds", 1) > 1 and s is not None and not math.isnan(s):
            out.append(f"{_num(m, digits)} ± {_num(s, digits)}")
        else:
            out.append(_num(m, digits))
    return out


def _pm_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], digits: int | None = 2,
              keep: Sequence[tuple[str, str]] = (("label", "method"),)) -> str:
    present = [(k, t) for k, t in columns if any(not (isinstance(r.get(k), float) and math.isnan(r[k]))
                                                  and r.get(k) is not None for r in rows)]
    cols = [_pm_col(rows, k, digits) for k, _ in present]
    table = [{**{k: r.get(k) for k, _ in keep}, **{t: c[i] for (_, t), c in zip(present, cols)}}
             for i, r in enumerate(rows)]
    return markdown_table(table, [*keep, *((t, t) for _, t in present)])


def study_figures(got: Mapping[str, list[dict[str, Any]]], summary: Sequence[dict[str, Any]],
                  bits: Sequence[str] = DEFAULT_BITS) -> dict[str, Any]:
    """Accuracy vs bits per method, trace vs W4A4 drop, predicted vs measured damage (plotly)."""
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in summary):
        rows = [r for r in summary if r["model"] == model]
        fig = go.Figure()
        xs = ["FP32", *[b for b in bits if any(f"{b}_minmax_accuracy" in r for r in rows)]]
        for r in rows:
            ys = [r["fp_accuracy"], *[r.get(f"{b}_minmax_accuracy", math.nan) for b in xs[1:]]]
            es = [r["fp_accuracy_std"], *[r.get(f"{b}_minmax_accuracy_std", math.nan) for b in xs[1:]]]
            fig.add_trace(go.Scatter(x=xs, y=ys, error_y={"type": "data", "array": es}, mode="lines+markers",
                                     name=r["label"]))
        fig.update_layout(title=f"{model}: test accuracy after PTQ (min-max, mean ± std over seeds)",
                          xaxis_title="setting", yaxis_title="accuracy (%)", template="plotly_white")
        figs[f"accuracy_vs_bits_{model}"] = fig
        members = [m for m in got["members"] if m["model"] == model]
        drop = {r["job"]: r["drop"] for r in got["ptq"] if r["config"] == "W4A4" and r.get("observer") == "minmax"
                and r.get("quant_attn") in (True, None)}
        fig = go.Figure()
        for label in config_order(m["label"] for m in members):
            ms = [m for m in members if m["label"] == label]
            fig.add_trace(go.Scatter(x=[m.get("trace") for m in ms], y=[drop.get(m["job"]) for m in ms],
                                     mode="markers", name=label, marker={"size": 10},
                                     text=[f"seed {m['seed']}" for m in ms]))
        fig.update_layout(title=f"{model}: Hessian trace vs accuracy lost at W4A4", xaxis_title="Hessian trace",
                          yaxis_title="W4A4 accuracy drop (points)", xaxis_type="log", template="plotly_white")
        figs[f"trace_vs_drop_{model}"] = fig
        fig = go.Figure()
        for b in (4, 3):
            xs_, ys_ = [m.get(f"predicted_increase_w{b}") for m in members], [m.get(f"measured_increase_w{b}")
                                                                                for m in members]
            fig.add_trace(go.Scatter(x=xs_, y=ys_, mode="markers", name=f"W{b}",
                                     text=[f"{m['label']} seed {m['seed']}" for m in members]))
        vals = [v for m in members for b in (4, 3) for v in (m.get(f"predicted_increase_w{b}"),
                                                              m.get(f"measured_increase_w{b}"))
                if v is not None and v > 0]
        if vals:
            lo, hi = min(vals), max(vals)
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = measured",
                                     line={"dash": "dash", "color": "gray"}))
        fig.update_layout(title=f"{model}: predicted (½ Σ σ² H_ii) vs measured loss increase, weights only",
                          xaxis_title="predicted", yaxis_title="measured", xaxis_type="log", yaxis_type="log",
                          template="plotly_white")
        figs[f"predicted_vs_measured_{model}"] = fig
    return figs


def write_report(folder: str | Path, *, dest: str | Path | None = None, md: str | Path | None = None,
                 bits: Sequence[str] = DEFAULT_BITS) -> dict[str, Path]:
    """Tables (CSV), figures (HTML + JSON) and ``results.md`` of a study folder, in ``dest``
    (default ``folder/report``); with ``md``, the generated Markdown also replaces the block between
    :data:`BEGIN` and :data:`END` in that file (created if missing), links relative to it.

    Raises:
        RunDirError: no ``main`` sweep with a finished member in ``folder``.
    """
    import json

    from .. import plots

    folder = Path(folder)
    dest = Path(dest) if dest is not None else folder / "report"
    dest.mkdir(parents=True, exist_ok=True)
    main = collect_study(folder)
    if not main["members"]:
        raise RunDirError(f"{folder}: no study member finished; see {folder / 'main' / 'summary.json'}")
    study = json.loads((folder / "study.json").read_text()) if (folder / "study.json").is_file() else {}
    selected = json.loads((folder / "selected.json").read_text()) if (folder / "selected.json").is_file() else None
    summary = summarize(main, bits)["rows"]
    rho = spearman_table(main)
    write_csv(dest / "members.csv", main["members"])
    write_csv(dest / "ptq.csv", main["ptq"])
    write_csv(dest / "flatness.csv", main["flatness"])
    write_csv(dest / "summary.csv", [{k: v for k, v in r.items() if not k.endswith("_values")} for r in summary])
    write_csv(dest / "spearman.csv", rho)
    if selected:
        write_csv(dest / "search.csv", selected["table"])
    if main["failed"]:
        write_csv(dest / "failed.csv", main["failed"])
    figs = study_figures(main, summary, bits)
    for name, fig in figs.items():
        plots.save_figure(fig, dest / "figures" / name, formats=("html", "json"), include_plotlyjs="directory")
    base = Path(md).parent if md is not None else dest
    rel = os.path.relpath(dest, base)

    def link(name: str) -> str:
        return f"[{name}]({Path(rel, 'figures', name + '.html').as_posix()})"

    git = study.get("git") or {}
    hw = sorted({m["hardware"] for m in main["members"]})
    models = list(dict.fromkeys(m["model"] for m in main["members"]))
    seeds = sorted({m["seed"] for m in main["members"]})
    targets_bits = sorted({f"W{m['noise_w_bits']}A{m['noise_a_bits']}" for m in main["members"]
                           if m["method"] != "plain"})
    lines = [BEGIN, "",
             f"_Generated by `workbench study report` from `{folder.name}` (git commit "
             f"`{str(git.get('commit'))[:10]}`{' dirty' if git.get('dirty') else ''}); tables as CSV in "
             f"[`{rel}`]({rel}). Do not edit between the study markers: regenerate._", "",
             f"- data: `{main['members'][0]['data']}`; models: {', '.join(f'`{m}`' for m in models)}; "
             f"seeds {seeds}; {len(main['members'])} members"
             + (f", {len(main['failed'])} failed" if main["failed"] else ""),
             f"- epochs: {sorted({m['epochs'] for m in main['members']})}; noise targets (weight/activation "
             f"bits): {', '.join(targets_bits)}",
             f"- hardware: {'; '.join(hw)}", ""]
    if selected:
        keys = list(selected["values"])
        lines += ["### Noise multiplier search (validation split carved from the training set)", "",
                  f"Rule: {selected['rule']}. Chosen: "
                  + ", ".join(f"`{k}={v}`" for k, v in selected["values"].items()) + ".", "",
                  markdown_table(selected["table"], [("label", "method"), *((k, k) for k in keys),
                                                ("val_fp_accuracy", "val FP acc"),
                                                ("reference_fp_accuracy", "reference FP acc"),
                                                *((c, c.replace("_", " ")) for c in selected["table"][0]
                                                  if c.startswith("val_W")),
                                                ("eligible", "eligible"), ("chosen", "chosen")]), ""]
    for model in models:
        rows = [r for r in summary if r["model"] == model]
        present_bits = [b for b in bits if any(f"{b}_minmax_accuracy" in r for r in rows)]
        lines += [f"### `{model}`: test accuracy (%), min-max observer, attention matmuls quantized", "",
                  _pm_table(rows, [("fp_accuracy", "FP32"), *((f"{b}_minmax_accuracy", b) for b in present_bits)]),
                  "", f"### `{model}`: accuracy drop vs FP (points)", "",
                  _pm_table(rows, [(f"{b}_minmax_drop", b) for b in present_bits]), ""]
        others = sorted({k.split("_")[1] for r in rows for k in r if re.match(r"W\d+A\d+_[a-z]+_accuracy$", k)}
                        - {"minmax"})
        for obs in others:
            lines += [f"### `{model}`: accuracy with the `{obs}` observer", "",
                      _pm_table(rows, [(f"{b}_{obs}_accuracy", b) for b in present_bits]), ""]
        if any("W4A4_minmax_noattn_accuracy" in r for r in rows):
            lines += [f"### `{model}`: attention matmuls left in floating point (min-max)", "",
                      _pm_table(rows, [(f"{b}_minmax_noattn_accuracy", b) for b in present_bits]), ""]
        lines += [f"### `{model}`: curvature (on {main['flatness'][0]['n_hessian'] if main['flatness'] else '?'} "
                  "training images) and predicted vs measured weight-quantization loss increase", "",
                  _pm_table(rows, [("trace", "trace"), ("top_eigenvalue", "top eig"),
                                   ("sigma_trace_w4", "σ-trace W4"),
                                   ("predicted_increase_w4", "pred W4"), ("measured_increase_w4", "meas W4"),
                                   ("predicted_increase_w3", "pred W3"), ("measured_increase_w3", "meas W3")],
                            digits=None), "",
                  f"### `{model}`: cost", "",
                  _pm_table(rows, [("epoch_time_s", "s / epoch"), ("time_vs_plain", "x plain"),
                                   ("time_vs_sam", "x SAM")]), ""]
        effects = paired_effects(main, model)
        if effects:
            lines += [f"### `{model}`: paired differences to `plain` (same seed; min-max, 95 % t interval)", "",
                      markdown_table([effect_cells(e) for e in effects],
                                [("config", "setting"), ("arm", "method"), ("n_pairs", "seeds"), ("diff", "difference"),
                                 ("ci", "95 % interval"), ("verdict", "verdict")]), ""]
        lines += [f"Figures: {link(f'accuracy_vs_bits_{model}')}, {link(f'trace_vs_drop_{model}')}, "
                  f"{link(f'predicted_vs_measured_{model}')}.", ""]
    lines += ["### Which curvature measure ranks the damage? (Spearman over members)", "",
              markdown_table(rho, [("model", "model"), ("damage", "damage"), ("members", "n"),
                              ("top_eigenvalue", "top eig"), ("trace", "trace"), ("sigma_trace_w4", "σ-trace W4"),
                              ("predicted_increase_w4", "pred W4"), ("predicted_increase_w3", "pred W3"),
                              ("sharpness_ascent", "sharpness")]), ""]
    if main["failed"]:
        lines += ["### Failed members", "", markdown_table(main["failed"], [("job", "job"), ("error", "error")]), ""]
    lines.append(END)
    block = "\n".join(lines)
    atomic_write_text(dest / "results.md", "# Study results\n\n" + block + "\n")
    paths = {"dest": dest, "results_md": dest / "results.md"}
    if md is not None:
        md = Path(md)
        text = md.read_text(encoding="utf-8") if md.is_file() else "# Results\n\n" + BEGIN + "\n" + END + "\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            text = head + block + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        atomic_write_text(md, text)
        paths["md"] = md
    return paths
