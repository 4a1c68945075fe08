"""PTQ results: accuracy against bits, weights-only against activations-only, bits per layer, and the
cost and damage of the pre-conditioning methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from ..errors import ConfigError
from .inputs import Rows, as_rows, hover_value, num
from .style import DASHES, KIND_COLORS, OBSERVER_DASH, method_color, styled, template

SWEEP_COLUMNS = ("method", "w_bits", "a_bits", "accuracy")
_METRIC_TITLES = {"accuracy": "top-1 accuracy (%)", "loss": "test loss (nats)"}


def run_label(r: Mapping[str, Any]) -> str:
    ck = r.get("checkpoint")
    if ck and ck not in ("model", r.get("method")):
        p = Path(str(ck))
        # runs/dnq/model.pt -> "dnq/model.pt": the folder names the run
        return f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    return str(r.get("method") or "model")


def accuracy_vs_bits(rows: Any, *, x: str = "auto", metric: str = "accuracy",
                     title: str | None = None) -> go.Figure:
    """Accuracy (or loss) against bit width, one line per checkpoint/method and observer.

    Args:
        rows: ``ptq.sweep`` rows (columns ``method, w_bits, a_bits, accuracy``; optional
            ``checkpoint, observer, w_granularity, loss``). Full-precision rows (both bits None)
            become a dotted horizontal reference line per model.
        x: ``'w_bits'``, ``'a_bits'`` or ``'auto'`` (the shared bit width if every row has
            ``w_bits == a_bits``, else ``w_bits`` with one line per activation width). A missing
            side (``None``) counts as 32 (float).
    """
    rows = as_rows(rows, SWEEP_COLUMNS + ((metric,) if metric not in SWEEP_COLUMNS else ()), "PTQ sweep")
    if x not in ("auto", "w_bits", "a_bits"):
        raise ConfigError(f"x must be 'auto', 'w_bits' or 'a_bits', got {x!r}")
    fp = [r for r in rows if r["w_bits"] is None and r["a_bits"] is None]
    q = [r for r in rows if not (r["w_bits"] is None and r["a_bits"] is None)]
    same = all(r["w_bits"] == r["a_bits"] for r in q)
    xcol = "w_bits" if x == "auto" else x
    other = "a_bits" if xcol == "w_bits" else "w_bits"
    series: dict[tuple, Rows] = {}
    for r in q:
        key = (run_label(r), r.get("method"), r.get("observer"), r.get("w_granularity"),
               None if (x == "auto" and same) else (r[other] or 32))
        series.setdefault(key, []).append(r)
    observers = list(dict.fromkeys(k[2] for k in series))
    others = list(dict.fromkeys(k[4] for k in series))
    grans = {k[3] for k in series}
    fig = go.Figure()
    for key, srows in series.items():
        label, method, obs, gran, oth = key
        srows = sorted(srows, key=lambda r: r[xcol] or 32)
        parts = [label] + ([str(obs)] if len(observers) > 1 and obs else []) + \
                ([str(gran)] if len(grans) > 1 and gran else []) + \
                ([f"{'A' if other == 'a_bits' else 'W'}{oth}"] if oth is not None else [])
        dash = OBSERVER_DASH.get(str(obs), "solid") if len(observers) > 1 else \
            DASHES[others.index(oth) % len(DASHES)]
        hover = [f"{label} ({r.get('method')})<br>W{r['w_bits'] or 32}A{r['a_bits'] or 32}, observer "
                 f"{r.get('observer')}, weights {r.get('w_granularity') or '-'}<br>{metric} {hover_value(num(r[metric]))}"
                 for r in srows]
        fig.add_scatter(x=[r[xcol] or 32 for r in srows], y=[num(r[metric]) for r in srows],
                        mode="lines+markers", name=" · ".join(parts), hovertext=hover, hoverinfo="text",
                        line=dict(color=method_color(method or label), dash=dash), marker=dict(size=8))
    xs = sorted({r[xcol] or 32 for r in q}) or [8]
    for r in fp:
        label = run_label(r)
        fig.add_scatter(x=[min(xs) - 0.3, max(xs) + 0.3], y=[num(r[metric])] * 2, mode="lines",
                        name=f"{label} · FP32", line=dict(color=method_color(r.get("method") or label), dash="dot",
                                                          width=1.5),
                        hovertext=f"{label} full precision: {metric} {hover_value(num(r[metric]))}", hoverinfo="text")
    xtitle = "bit width (weights = activations)" if (x == "auto" and same) else \
        f"{'weight' if xcol == 'w_bits' else 'activation'} bits"
    styled(fig, title or f"PTQ {metric} vs bit width", xaxis_title=xtitle,
            yaxis_title=_METRIC_TITLES.get(metric, metric))
    fig.update_xaxes(tickmode="array", tickvals=xs)
    return fig


def wqe_vs_aqe_plot(rows: Any, *, metric: str = "accuracy", title: str | None = None) -> go.Figure:
    """Which hurts more? ``metric`` vs bits with weights only, activations only and both quantized.

    Args:
        rows: ``ptq.wqe_vs_aqe`` rows (columns ``bits, quantized`` and ``metric``).
    """
    rows = as_rows(rows, ("bits", "quantized", metric), "WQE-vs-AQE table")
    fig = go.Figure()
    colors = {"weights": KIND_COLORS["wqe"], "activations": KIND_COLORS["aqe"], "both": "#444444"}
    qrows = [r for r in rows if r["quantized"] != "none"]
    for kind in ("weights", "activations", "both"):
        sub = sorted((r for r in qrows if r["quantized"] == kind), key=lambda r: r["bits"])
        if sub:
            fig.add_scatter(x=[r["bits"] for r in sub], y=[num(r[metric]) for r in sub], mode="lines+markers",
                            name=f"{kind} quantized", line=dict(color=colors[kind]),
                            hovertemplate=f"{kind} quantized at %{{x}} bits: {metric} %{{y:.4g}}<extra></extra>")
    for r in rows:
        if r["quantized"] == "none":
            fig.add_hline(y=num(r[metric]), line=dict(color="#999999", dash="dot"),
                          annotation_text="full precision")
    styled(fig, title or "Weight vs activation quantization error", xaxis_title="bit width",
            yaxis_title=_METRIC_TITLES.get(metric, metric))
    return fig


def bits_per_layer(allocations: Any, *, title: str | None = "Weight bits per layer") -> go.Figure:
    """Bars of the weight bits each layer gets, one bar group per allocation (a
    :class:`workbench.ptq.Allocation`, its ``to_dict()``, or ``{name: allocation}``); the hover
    text gives each layer's predicted loss increase."""
    items = allocations if isinstance(allocations, Mapping) and "bits" not in allocations else {"allocation": allocations}
    fig = go.Figure()
    for name, a in items.items():
        d = a.to_dict() if hasattr(a, "to_dict") else dict(a)
        layers = d.get("layers") or [{"layer": k, "bits": v} for k, v in d["bits"].items()]
        label = f"{name}: {d.get('average_bits', float('nan')):.2f} bits, predicted +{d.get('predicted', float('nan')):.4f}"
        fig.add_trace(go.Bar(x=[r["layer"] for r in layers], y=[r["bits"] for r in layers], name=label,
                             hovertext=[f"predicted +{r.get('predicted', float('nan')):.5f}" for r in layers]))
    return styled(fig, title, barmode="group", xaxis_title="layer", yaxis_title="weight bits",
                   xaxis_tickangle=-45)


def cost_figure(rows: Sequence[dict[str, Any]], title: str = "Accuracy after PTQ against training cost") -> Any:
    """Quantized accuracy against training time per step, one marker per method and setting
    (``compare`` rows; introduced in 04_preconditioning)."""
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        fig.add_trace(go.Scatter(
            x=[r["step_time_s"] for r in rs], y=[r["quant_accuracy"] for r in rs], mode="markers+text",
            text=[r["config"] for r in rs], textposition="top center", name=method,
            marker={"size": 11, "color": method_color(method)},
            hovertemplate=f"{method} %{{text}}<br>%{{x:.3f}} s/step<br>%{{y:.2f}} %<extra></extra>"))
    fig.update_layout(template=template(), title=title, xaxis_title="training time per step (s)",
                      yaxis_title="accuracy after PTQ (%)")
    return fig


def drop_figure(rows: Sequence[dict[str, Any]], title: str = "Accuracy lost to PTQ") -> Any:
    """Grouped bars of ``drop`` (FP minus quantized accuracy) per PTQ setting, one colour per method
    (``compare`` rows; introduced in 07_report)."""
    fig = go.Figure()
    for method in dict.fromkeys(str(r["method"]) for r in rows):
        rs = [r for r in rows if str(r["method"]) == method]
        fig.add_trace(go.Bar(x=[f"{r['config']} {r.get('observer') or ''}".strip() for r in rs],
                             y=[r["drop"] for r in rs], name=method, marker_color=method_color(method)))
    fig.update_layout(template=template(), title=title, barmode="group", xaxis_title="PTQ setting",
                      yaxis_title="accuracy drop (percentage points)")
    return fig
