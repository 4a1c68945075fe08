"""Plotly figures built from the tidy tables the workbench returns.

Every builder takes what a compute module returns (a list of dict rows, a result dataclass or a
mapping of names to results) and gives back a :class:`plotly.graph_objects.Figure`. A pandas
``DataFrame`` is accepted wherever rows are (pandas is not a dependency; it is only recognised).

One look everywhere: the ``workbench`` template (:func:`template`) and one colour per method
name (:func:`method_color`), so ``dnq`` is the same colour in a training curve, a PTQ sweep and a
spectral density. Axis titles carry units; hover text says what a point is.

======================  =========================================  ================================
figure                  input                                      from
======================  =========================================  ================================
training_curves         history rows, or {run: rows/TrainResult}   ``train.fit(...).history``
error_histogram         error samples (+ step or pred_std)         ``errormodel.error_samples``
layer_error_bars        rows: layer, kind, std, pred_std           ``errormodel.measure``
accuracy_vs_bits        rows: method, w_bits, a_bits, accuracy     ``ptq.sweep``
wqe_vs_aqe_plot         rows: bits, quantized, accuracy            ``ptq.wqe_vs_aqe``
eigen_density           DensityResult or {name: DensityResult}     ``flatness.spectral_density``
landscape_1d            Landscape1D or {name: Landscape1D}         ``landscape.landscape_1d/_line``
landscape_2d            Landscape2D                                ``landscape.landscape_2d``
prediction_vs_measured  QuantPrediction(s) or damage_table rows    ``flatness``
======================  =========================================  ================================

:func:`save_figure` writes interactive HTML and static images (PNG/SVG/PDF through kaleido when it
is installed and finds a Chrome/Chromium; otherwise it logs why and writes HTML + JSON instead).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .errors import ConfigError

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]

# ---------------------------------------------------------------------------------- style

#: One colour per method name (Okabe-Ito palette: distinguishable with colour-blindness).
METHOD_COLORS: dict[str, str] = {
    "plain": "#444444",
    "dnq": "#D55E00",
    "wnoise": "#E69F00",
    "anoise": "#56B4E9",
    "uniform": "#009E73",
    "sam": "#0072B2",
    "swa": "#CC79A7",
    "fp32": "#999999",
}
#: Colours for names outside METHOD_COLORS, picked by a stable hash of the name.
_EXTRA_COLORS = ("#1B9E77", "#7570B3", "#E7298A", "#66A61E", "#A6761D", "#1F78B4", "#B15928", "#6A3D9A",
                 "#F0027F", "#386CB0")
#: Error kinds and the model curves of the error histogram.
KIND_COLORS = {"wqe": "#0072B2", "aqe": "#D55E00"}
MODEL_COLORS = {"measured": "#7F7F7F", "gaussian": "#D55E00", "uniform": "#009E73", "injected": "#0072B2"}
OBSERVER_DASH = {"minmax": "solid", "percentile": "dash", "mse": "dot"}
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_TEMPLATE: go.layout.Template | None = None


def method_color(name: str | None) -> str:
    """The colour of a method (or run) name: fixed for the registered methods, stable for others.

    ``"dnq-k2"`` or ``"runs/dnq/model.pt"`` take the colour of ``dnq``, so runs of one method match.
    """
    key = str(name or "").lower()
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    for part in key.replace("\\", "/").replace("-", "/").replace("_", "/").replace(" ", "/").split("/"):
        if part in METHOD_COLORS:
            return METHOD_COLORS[part]
    return _EXTRA_COLORS[zlib.crc32(key.encode()) % len(_EXTRA_COLORS)]  # crc32: same in every process


def template() -> go.layout.Template:
    """The ``workbench`` plotly template (plotly_white with larger fonts and unified legend look)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        t = go.layout.Template(pio.templates["plotly_white"])
        t.layout.update(font=dict(size=13), title=dict(x=0.02, xanchor="left"), hovermode="closest",
                        legend=dict(bgcolor="rgba(255,255,255,0.6)"), margin=dict(l=70, r=30, t=60, b=60),
                        colorway=list(METHOD_COLORS.values()) + list(_EXTRA_COLORS))
        _TEMPLATE = t
    return _TEMPLATE


def _styled(fig: go.Figure, title: str | None, **layout: Any) -> go.Figure:
    fig.update_layout(template=template(), title=title, **layout)
    return fig


# ---------------------------------------------------------------------------------- inputs


def as_rows(table: Any, required: Sequence[str] = (), what: str = "table") -> Rows:
    """Rows (a list of dicts) from rows, a ``TrainResult``, a result dataclass list or a pandas DataFrame.

    Raises:
        ConfigError: the table is empty or a row lacks one of ``required`` (the message lists them).
    """
    if hasattr(table, "history") and isinstance(table.history, list):  # TrainResult
        table = table.history
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame, without importing pandas
        table = table.to_dict("records")
    if isinstance(table, Mapping) or not isinstance(table, Iterable) or isinstance(table, (str, bytes)):
        raise ConfigError(f"{what} must be a list of dict rows (or a pandas DataFrame), got {type(table).__name__}"
                          f"; expected columns: {', '.join(required)}")
    rows: Rows = []
    for r in table:
        if dataclasses.is_dataclass(r) and not isinstance(r, type):
            r = r.to_dict() if hasattr(r, "to_dict") else dataclasses.asdict(r)
        if not isinstance(r, Mapping):
            raise ConfigError(f"{what} rows must be dicts, got {type(r).__name__}")
        rows.append(dict(r))
    if not rows:
        raise ConfigError(f"{what} is empty: expected rows with columns {', '.join(required)}")
    missing = sorted({c for r in rows for c in required if c not in r})
    if missing:
        raise ConfigError(f"{what} lacks column(s) {missing}; expected columns: {', '.join(required)} "
                          f"(found: {', '.join(rows[0])})")
    return rows


def _num(v: Any) -> float | None:
    """A plottable number: None and NaN become None (a gap), everything else a float."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _as_list(x: Any) -> list[float]:
    """Floats from a tensor, an array or a sequence (no torch/numpy import needed here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "flatten"):
        x = x.flatten()
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [float(v) for v in x]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------------- training curves

#: Columns every history row needs for :func:`training_curves`.
HISTORY_COLUMNS = ("epoch", "train_loss", "test_loss", "test_accuracy")
#: (metric, panel, dash, label) of the training figure: train solid, test dashed, val dotted.
CURVES = (("train_loss", 1, "solid", "train loss"), ("test_loss", 1, "dash", "test loss"),
          ("val_loss", 1, "dot", "val loss"), ("test_accuracy", 2, "solid", "test accuracy"),
          ("val_accuracy", 2, "dot", "val accuracy"))


def training_figure(title: str | None = "Training curves") -> go.Figure:
    """The empty two-panel layout (loss | accuracy) shared by :func:`training_curves` and the live monitor."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"), horizontal_spacing=0.1)
    fig.update_xaxes(title_text="epoch", row=1, col=1)
    fig.update_xaxes(title_text="epoch", row=1, col=2)
    fig.update_yaxes(title_text="cross-entropy loss (nats)", row=1, col=1)
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=2)
    return _styled(fig, title, legend=dict(groupclick="togglegroup"))


def curve_trace(run: str, metric: str, method: str | None = None,
                x: Sequence[Any] = (), y: Sequence[Any] = ()) -> go.Scatter:
    """One run's curve for one metric, styled like every other one (colour = method, dash = split)."""
    _, _, dash, label = next(c for c in CURVES if c[0] == metric)
    unit = "%" if "accuracy" in metric else " nats"
    return go.Scatter(
        x=list(x), y=list(y), mode="lines+markers", name=f"{run} · {label}", legendgroup=run,
        line=dict(color=method_color(method or run), dash=dash), marker=dict(size=5),
        hovertemplate=f"run {run}<br>{label}<br>epoch %{{x}}: %{{y:.4g}}{unit}<extra></extra>")


def _runs(runs: Any) -> dict[str, Rows]:
    """``{run name: history rows}`` from one table (grouped by 'run', else 'method') or a mapping."""
    if isinstance(runs, Mapping):
        if not runs:
            raise ConfigError("no runs given: expected {run name: history rows}")
        return {str(k): as_rows(v, HISTORY_COLUMNS, f"history of run {k!r}") for k, v in runs.items()}
    rows = as_rows(runs, HISTORY_COLUMNS, "training history")
    out: dict[str, Rows] = {}
    for r in rows:
        out.setdefault(str(r.get("run") or r.get("method") or "run"), []).append(r)
    return out


def training_curves(runs: Any, *, title: str | None = "Training curves") -> go.Figure:
    """Loss and accuracy per epoch, several runs overlaid (colour = method, dash = train/test/val).

    Args:
        runs: history rows (columns ``epoch, train_loss, test_loss, test_accuracy``; optional
            ``val_loss, val_accuracy``, ``method``, ``run``), grouped into runs by ``run`` or else
            ``method``; or ``{run name: rows or TrainResult}``.

    Raises:
        ConfigError: no rows, or a missing column.
    """
    fig = training_figure(title)
    for run, rows in _runs(runs).items():
        rows = sorted(rows, key=lambda r: r["epoch"])
        method = rows[0].get("method")
        for metric, panel, _, _ in CURVES:
            if not any(metric in r for r in rows):
                continue
            fig.add_trace(curve_trace(run, metric, method, [r["epoch"] for r in rows],
                                      [_num(r.get(metric)) for r in rows]), row=1, col=panel)
    return fig


# ---------------------------------------------------------------------------------- error histograms


def _gauss(x: float, std: float) -> float:
    return math.exp(-0.5 * (x / std) ** 2) / (std * math.sqrt(2 * math.pi))


def histogram_density(samples: Sequence[float], lo: float, hi: float, nbins: int) -> tuple[list, list, list]:
    """Bin centres, densities and counts of ``samples`` on ``nbins`` equal bins over [lo, hi]."""
    width = (hi - lo) / nbins
    counts = [0] * nbins
    for v in samples:
        i = int((v - lo) / width)
        if 0 <= i <= nbins:
            counts[min(i, nbins - 1)] += 1
    n = max(1, len(samples))
    centres = [lo + (i + 0.5) * width for i in range(nbins)]
    return centres, [c / (n * width) for c in counts], counts


def noise_curve(std: float, lo: float, hi: float, points: int = 201) -> tuple[list[float], list[float]]:
    """A zero-mean Gaussian density N(0, std²) on [lo, hi]."""
    xs = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    return xs, [_gauss(x, std) for x in xs]


def error_histogram(samples: Any, *, step: float | None = None, pred_std: float | None = None,
                    normalized: bool = False, noise_mult: float | None = None, layer: str | None = None,
                    kind: str | None = None, bits: int | None = None, nbins: int = 60,
                    title: str | None = None) -> go.Figure:
    """Histogram of measured quantization errors with the Gaussian and uniform models overlaid.

    The models have the std of a uniform quantizer, ``σ = Δ/√12``: the Gaussian ``N(0, σ²)`` (what
    DNQ injects) and the uniform on ``[-Δ/2, Δ/2]`` (rounding). With ``noise_mult=k`` a third curve
    shows the injected Gaussian of std ``k·σ``.

    Args:
        samples: errors ``Q(t) - t`` (tensor, array or list), e.g. from ``errormodel.error_samples``.
        step: the quantizer step Δ (not needed when ``normalized``).
        pred_std: the model's σ if it is not ``step/√12`` (a ``measure`` row's ``pred_std`` for
            per-channel weights, where steps differ between channels).
        normalized: the samples are in units of the step (``error_samples(..., normalized=True)``).

    Raises:
        ConfigError: no samples, or neither ``step`` nor ``pred_std`` for raw errors.
    """
    xs = _as_list(samples)
    if not xs:
        raise ConfigError("error_histogram got no samples")
    if normalized:
        step = 1.0
    sigma = pred_std if pred_std is not None else (step / math.sqrt(12.0) if step else None)
    if not sigma or sigma <= 0:
        raise ConfigError("error_histogram needs step (the quantizer step Δ) or pred_std for raw errors; "
                          "or pass normalized samples with normalized=True")
    half = math.sqrt(3.0) * sigma  # the uniform with std sigma lives on [-half, half]
    span = max(max(abs(v) for v in xs), 1.6 * half, 3.5 * sigma * (noise_mult or 0))
    lo, hi = -span * 1.05, span * 1.05
    unit = "Δ (steps)" if normalized else "tensor units"
    centres, dens, counts = histogram_density(xs, lo, hi, nbins)
    fig = go.Figure()
    fig.add_bar(x=centres, y=dens, width=(hi - lo) / nbins, name="measured error", customdata=counts,
                marker=dict(color=MODEL_COLORS["measured"], line=dict(width=0)), opacity=0.6,
                hovertemplate=f"measured error ≈ %{{x:.3g}} {unit}<br>density %{{y:.3g}}"
                              "<br>%{customdata} samples<extra></extra>")
    gx, gy = noise_curve(sigma, lo, hi)
    fig.add_scatter(x=gx, y=gy, mode="lines", name="Gaussian model N(0, Δ²/12)",
                    line=dict(color=MODEL_COLORS["gaussian"], width=2),
                    hovertemplate="Gaussian model<br>error %{x:.3g}: density %{y:.3g}<extra></extra>")
    u = 1.0 / (2 * half)
    fig.add_scatter(x=[lo, -half, -half, half, half, hi], y=[0, 0, u, u, 0, 0], mode="lines",
                    name="uniform model U(-Δ/2, Δ/2)", line=dict(color=MODEL_COLORS["uniform"], width=2),
                    hovertemplate="uniform model<br>error %{x:.3g}: density %{y:.3g}<extra></extra>")
    if noise_mult is not None:
        fig.add_trace(injected_trace(noise_mult, sigma, lo, hi))
    measured_std = math.sqrt(sum(v * v for v in xs) / len(xs) - (sum(xs) / len(xs)) ** 2)
    what = " ".join(s for s in ((kind or "").upper(), f"of {layer}" if layer else "",
                                f"at {bits} bits" if bits else "") if s)
    _styled(fig, title or f"{what or 'Quantization error'}: measured vs noise models", bargap=0,
            xaxis_title=f"quantization error Q(t) − t ({unit})", yaxis_title="probability density",
            legend=dict(x=0.99, xanchor="right", y=0.99))
    fig.add_annotation(x=0.01, y=0.99, xref="paper", yref="paper", xanchor="left", yanchor="top",
                       showarrow=False, align="left",
                       text=f"measured std / (Δ/√12) = {measured_std / sigma:.3f}<br>{len(xs)} samples")
    return fig


def injected_trace(noise_mult: float, sigma: float, lo: float, hi: float) -> go.Scatter:
    """The injected training noise N(0, (k·Δ/√12)²) as a dotted curve (the noise lab moves k)."""
    k = max(float(noise_mult), 1e-6)
    x, y = noise_curve(k * sigma, lo, hi)
    return go.Scatter(x=x, y=y, mode="lines", name=f"injected noise, k = {noise_mult:g}",
                      line=dict(color=MODEL_COLORS["injected"], width=2, dash="dot"),
                      hovertemplate=f"injected Gaussian, std = {noise_mult:g}·Δ/√12"
                                    "<br>error %{x:.3g}: density %{y:.3g}<extra></extra>")


# ---------------------------------------------------------------------------------- per-layer errors

LAYER_ERROR_COLUMNS = ("layer", "kind", "std", "pred_std")


def layer_error_bars(rows: Any, *, value: str = "std", title: str | None = None) -> go.Figure:
    """Per-layer measured error std next to the model's ``Δ/√12`` (``value='std'``, log scale), or
    their ratio with a reference line at 1 (``value='ratio'``); one panel per kind (WQE, AQE).

    Args:
        rows: ``errormodel.measure`` rows (columns ``layer, kind, std, pred_std``; ``bits, ratio,
            kurtosis, ks_gaussian, site`` are shown on hover when present).
    """
    if value not in ("std", "ratio"):
        raise ConfigError(f"value must be 'std' or 'ratio', got {value!r}")
    rows = as_rows(rows, LAYER_ERROR_COLUMNS, "per-layer error table")
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig = make_subplots(rows=len(kinds), cols=1, shared_xaxes=False, vertical_spacing=0.2 if len(kinds) > 1 else 0,
                        subplot_titles=[f"{k.upper()}: {'weight' if k == 'wqe' else 'activation'} quantization "
                                        "error" for k in kinds])
    for i, kind in enumerate(kinds, start=1):
        sub = [r for r in rows if r["kind"] == kind]
        names = [f"{r['layer']}" for r in sub]
        ratio = [_num(r.get("ratio")) if r.get("ratio") is not None else
                 (_num(r["std"]) / r["pred_std"] if r["pred_std"] else None) for r in sub]
        hover = [f"{r['layer']} ({kind.upper()}, {r.get('site', '')}, {r.get('bits', '?')} bits)<br>"
                 f"measured std {_fmt(_num(r['std']))}<br>model Δ/√12 {_fmt(_num(r['pred_std']))}<br>"
                 f"ratio {_fmt(q)}<br>excess kurtosis {_fmt(_num(r.get('kurtosis')))} "
                 f"(Gaussian 0, uniform −1.2)<br>KS to Gaussian {_fmt(_num(r.get('ks_gaussian')))}"
                 for r, q in zip(sub, ratio)]
        if value == "std":
            fig.add_bar(x=names, y=[_num(r["std"]) for r in sub], name=f"measured {kind.upper()} std",
                        marker_color=KIND_COLORS.get(kind, "#555555"), hovertext=hover, hoverinfo="text",
                        row=i, col=1)
            fig.add_bar(x=names, y=[_num(r["pred_std"]) for r in sub], name=f"model Δ/√12 ({kind.upper()})",
                        marker_color="#BBBBBB", hovertext=hover, hoverinfo="text", row=i, col=1)
            fig.update_yaxes(type="log", title_text="error std (tensor units)", row=i, col=1)
        else:
            fig.add_bar(x=names, y=ratio, name=f"{kind.upper()} measured / model",
                        marker_color=KIND_COLORS.get(kind, "#555555"), hovertext=hover, hoverinfo="text",
                        row=i, col=1)
            fig.add_hline(y=1.0, line=dict(color="#444444", dash="dash"), row=i, col=1)
            fig.update_yaxes(title_text="std / (Δ/√12)", row=i, col=1)
        fig.update_xaxes(title_text="layer", row=i, col=1)
    bits = sorted({r.get("bits") for r in rows if r.get("bits") is not None})
    return _styled(fig, title or f"Per-layer quantization error vs the Δ/√12 model"
                                 f"{' at ' + '/'.join(map(str, bits)) + ' bits' if bits else ''}",
                   barmode="group", height=320 * len(kinds) + 80)


# ---------------------------------------------------------------------------------- PTQ sweeps

SWEEP_COLUMNS = ("method", "w_bits", "a_bits", "accuracy")
_METRIC_TITLES = {"accuracy": "top-1 accuracy (%)", "loss": "test loss (nats)"}


def _label(r: Mapping[str, Any]) -> str:
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
        key = (_label(r), r.get("method"), r.get("observer"), r.get("w_granularity"),
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
            _DASHES[others.index(oth) % len(_DASHES)]
        hover = [f"{label} ({r.get('method')})<br>W{r['w_bits'] or 32}A{r['a_bits'] or 32}, observer "
                 f"{r.get('observer')}, weights {r.get('w_granularity') or '-'}<br>{metric} {_fmt(_num(r[metric]))}"
                 for r in srows]
        fig.add_scatter(x=[r[xcol] or 32 for r in srows], y=[_num(r[metric]) for r in srows],
                        mode="lines+markers", name=" · ".join(parts), hovertext=hover, hoverinfo="text",
                        line=dict(color=method_color(method or label), dash=dash), marker=dict(size=8))
    xs = sorted({r[xcol] or 32 for r in q}) or [8]
    for r in fp:
        label = _label(r)
        fig.add_scatter(x=[min(xs) - 0.3, max(xs) + 0.3], y=[_num(r[metric])] * 2, mode="lines",
                        name=f"{label} · FP32", line=dict(color=method_color(r.get("method") or label), dash="dot",
                                                          width=1.5),
                        hovertext=f"{label} full precision: {metric} {_fmt(_num(r[metric]))}", hoverinfo="text")
    xtitle = "bit width (weights = activations)" if (x == "auto" and same) else \
        f"{'weight' if xcol == 'w_bits' else 'activation'} bits"
    _styled(fig, title or f"PTQ {metric} vs bit width", xaxis_title=xtitle,
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
            fig.add_scatter(x=[r["bits"] for r in sub], y=[_num(r[metric]) for r in sub], mode="lines+markers",
                            name=f"{kind} quantized", line=dict(color=colors[kind]),
                            hovertemplate=f"{kind} quantized at %{{x}} bits: {metric} %{{y:.4g}}<extra></extra>")
    for r in rows:
        if r["quantized"] == "none":
            fig.add_hline(y=_num(r[metric]), line=dict(color="#999999", dash="dot"),
                          annotation_text="full precision")
    _styled(fig, title or "Weight vs activation quantization error", xaxis_title="bit width",
            yaxis_title=_METRIC_TITLES.get(metric, metric))
    return fig


# ---------------------------------------------------------------------------------- flatness


def _named(items: Any, what: str, default_name: str = "model") -> dict[str, Any]:
    if isinstance(items, Mapping) and not _looks_like_result(items):
        if not items:
            raise ConfigError(f"no {what} given")
        return {str(k): v for k, v in items.items()}
    if isinstance(items, (list, tuple)) and items and all(isinstance(t, tuple) and len(t) == 2 for t in items):
        return {str(k): v for k, v in items}
    return {default_name: items}


def _looks_like_result(d: Mapping) -> bool:
    return any(k in d for k in ("grid", "alphas", "predicted", "eigenvalues"))


def _field(obj: Any, name: str, what: str) -> Any:
    if isinstance(obj, Mapping):
        if name not in obj:
            raise ConfigError(f"{what} lacks {name!r}; expected keys: {', '.join(sorted(obj))}")
        return obj[name]
    if not hasattr(obj, name):
        raise ConfigError(f"{what} ({type(obj).__name__}) has no {name!r}")
    return getattr(obj, name)


def eigen_density(densities: Any, *, log_y: bool = True, eigenvalues: Mapping[str, Any] | None = None,
                  title: str | None = None) -> go.Figure:
    """Hessian eigenvalue density (stochastic Lanczos quadrature), several models overlaid.

    Args:
        densities: a ``flatness.DensityResult`` (or its ``to_dict()``), or ``{name: result}``.
        log_y: log density axis (the bulk near 0 dwarfs the outliers that matter).
        eigenvalues: ``{name: EigenResult or list of floats}``: top eigenvalues marked on the axis.
    """
    fig = go.Figure()
    floor = 1e-12  # log axes cannot show 0
    for name, d in _named(densities, "densities").items():
        grid = _as_list(_field(d, "grid", f"density {name!r}"))
        dens = _as_list(_field(d, "density", f"density {name!r}"))
        if not grid or len(grid) != len(dens):
            raise ConfigError(f"density {name!r}: grid and density must be non-empty and of equal length")
        fig.add_scatter(x=grid, y=[max(v, floor) for v in dens] if log_y else dens, mode="lines", name=name,
                        line=dict(color=method_color(name)),
                        hovertemplate=f"{name}<br>eigenvalue λ = %{{x:.4g}}<br>density %{{y:.3g}}<extra></extra>")
    for name, ev in (eigenvalues or {}).items():
        vals = _as_list(ev.eigenvalues if hasattr(ev, "eigenvalues") else
                        ev["eigenvalues"] if isinstance(ev, Mapping) else ev)
        fig.add_scatter(x=vals, y=[floor if log_y else 0.0] * len(vals), mode="markers",
                        name=f"{name} · top eigenvalues", marker=dict(symbol="triangle-up", size=12,
                                                                      color=method_color(name)),
                        hovertemplate=f"{name}: top eigenvalue %{{x:.4g}}<extra></extra>", cliponaxis=False)
    _styled(fig, title or "Hessian eigenvalue density", xaxis_title="Hessian eigenvalue λ (nats per unit² of weight)",
            yaxis_title="spectral density (per unit λ)")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def _curve(obj: Any, what: str) -> tuple[list[float], list[float | None], list[float | None] | None, str | None]:
    """(alphas, losses, accuracies or None, kind) of a 1-D landscape: a ``Landscape1D``, a dict, or rows."""
    if hasattr(obj, "rows") and callable(obj.rows):  # landscape.Landscape1D
        obj = obj.rows()
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], Mapping):
        rows = sorted(as_rows(obj, ("alpha", "loss"), what), key=lambda r: r["alpha"])
        acc = [_num(r.get("accuracy")) for r in rows] if "accuracy" in rows[0] else None
        return [float(r["alpha"]) for r in rows], [_num(r["loss"]) for r in rows], acc, rows[0].get("kind")
    alphas = _as_list(_pick(obj, ("alphas", "alpha"), what))
    losses = _as_list(_pick(obj, ("losses", "loss"), what))
    acc = _pick(obj, ("accuracies", "accuracy"), what, required=False)
    if len(alphas) != len(losses) or not alphas:
        raise ConfigError(f"{what}: alphas and losses must be non-empty and of equal length")
    return alphas, losses, (_as_list(acc) if acc is not None else None), _pick(obj, ("kind",), what, False)


def _pick(obj: Any, names: Sequence[str], what: str, required: bool = True) -> Any:
    for n in names:
        v = obj.get(n) if isinstance(obj, Mapping) else getattr(obj, n, None)
        if v is not None:
            return v
    if required:
        raise ConfigError(f"{what} has none of {list(names)}")
    return None


def landscape_1d(curves: Any, *, metric: str = "loss", log_y: bool = False, title: str | None = None) -> go.Figure:
    """Loss (or accuracy) along one direction through the weights, several models overlaid.

    Args:
        curves: a ``landscape.Landscape1D`` (random direction or the line between two models), a dict
            with ``alphas, losses`` (optional ``accuracies``, a fraction as the landscape module
            returns), rows with columns ``alpha, loss``, or ``{name: one of those}``.
        metric: ``'loss'`` or ``'accuracy'`` (drawn in percent).
    """
    if metric not in ("loss", "accuracy"):
        raise ConfigError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    fig = go.Figure()
    kinds = set()
    for name, c in _named(curves, "landscapes").items():
        a, loss, acc, kind = _curve(c, f"landscape {name!r}")
        kinds.add(kind)
        if metric == "accuracy" and acc is None:
            raise ConfigError(f"landscape {name!r} has no accuracies")
        y = loss if metric == "loss" else [None if v is None else 100 * v for v in acc]
        unit = "nats" if metric == "loss" else "%"
        fig.add_scatter(x=a, y=y, mode="lines+markers", name=name, line=dict(color=method_color(name)),
                        marker=dict(size=4),
                        hovertemplate=f"{name}<br>α = %{{x:.3g}}<br>{metric} %{{y:.4g}} {unit}<extra></extra>")
    line = kinds == {"line"}
    _styled(fig, title or ("Loss on the line between two models" if line else
                           "Loss along a random filter-normalized direction (1-D landscape)"),
            xaxis_title="interpolation α (0 = first model, 1 = second)" if line else
            "step α along the filter-normalized direction (relative to each filter's norm)",
            yaxis_title="loss (nats)" if metric == "loss" else "accuracy (%)")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def landscape_2d(surface: Any, *, kind: str = "contour", title: str | None = None) -> go.Figure:
    """Loss on a plane through the weights, as a contour map or a 3-D surface.

    Args:
        surface: a ``landscape.Landscape2D`` or a dict with ``alphas``, ``betas`` and ``losses`` where
            ``losses[i][j]`` is the loss at ``(alphas[i], betas[j])`` (the landscape module's layout).
        kind: ``'contour'`` or ``'surface'``.
    """
    if kind not in ("contour", "surface"):
        raise ConfigError(f"kind must be 'contour' or 'surface', got {kind!r}")
    a = _as_list(_pick(surface, ("alphas", "alpha"), "2-D landscape"))
    b = _as_list(_pick(surface, ("betas", "beta"), "2-D landscape"))
    z_raw = _pick(surface, ("losses", "loss"), "2-D landscape")
    grid = z_raw.tolist() if hasattr(z_raw, "tolist") else [list(r) for r in z_raw]
    if len(grid) != len(a) or any(len(r) != len(b) for r in grid):
        raise ConfigError(f"2-D landscape: losses must be a {len(a)} x {len(b)} grid (alphas x betas)")
    z = [[grid[i][j] for i in range(len(a))] for j in range(len(b))]  # plotly wants z[y][x]
    hover = "α = %{x:.3g}, β = %{y:.3g}<br>loss %{z:.4g} nats<extra></extra>"
    if kind == "contour":
        fig = go.Figure(go.Contour(x=a, y=b, z=z, colorscale="Viridis", name="loss", hovertemplate=hover,
                                   colorbar=dict(title="loss (nats)"), contours=dict(showlabels=True)))
        fig.add_scatter(x=[0.0], y=[0.0], mode="markers", name="trained weights", marker=dict(
            symbol="x", size=12, color="white", line=dict(width=1, color="black")),
            hovertemplate="the trained weights (α = β = 0)<extra></extra>")
        _styled(fig, title or "Loss landscape (contour)", xaxis_title="step α along direction 1",
                yaxis_title="step β along direction 2")
    else:
        fig = go.Figure(go.Surface(x=a, y=b, z=z, colorscale="Viridis", name="loss", hovertemplate=hover,
                                   colorbar=dict(title="loss (nats)")))
        _styled(fig, title or "Loss landscape (surface)")
        fig.update_scenes(xaxis_title="α (direction 1)", yaxis_title="β (direction 2)", zaxis_title="loss (nats)")
    return fig


PREDICTION_COLUMNS = ("name", "w_bits", "predicted", "measured")


def prediction_rows(items: Any) -> Rows:
    """``name, w_bits, predicted, predicted_stderr, measured, measured_noise, measured_noise_stderr`` rows
    from QuantPrediction objects (one, a list, or ``{name: ...}``), their ``to_dict()``s, or
    ``flatness.damage_table`` rows (``model, w_bits, predicted_increase, measured_increase``)."""
    if isinstance(items, Mapping) and "rows" in items and "spearman" in items:  # a whole damage_table result
        items = items["rows"]
    out: Rows = []
    if isinstance(items, list) and items and isinstance(items[0], Mapping) and "predicted_increase" in items[0]:
        for r in as_rows(items, ("model", "w_bits", "predicted_increase", "measured_increase"), "damage table"):
            out.append(dict(name=str(r["model"]), w_bits=r["w_bits"], predicted=_num(r["predicted_increase"]),
                            predicted_stderr=None, measured=_num(r["measured_increase"]), measured_noise=None,
                            measured_noise_stderr=None))
        return out
    for name, preds in _named(items, "predictions").items():
        for p in preds if isinstance(preds, (list, tuple)) else [preds]:
            d = p.to_dict() if hasattr(p, "to_dict") else dict(p)
            missing = [c for c in ("w_bits", "predicted", "measured_rtn") if c not in d]
            if missing:
                raise ConfigError(f"prediction {name!r} lacks {missing}; expected a flatness.QuantPrediction")
            out.append(dict(name=name, w_bits=d["w_bits"], predicted=_num(d["predicted"]),
                            predicted_stderr=_num(d.get("predicted_stderr")), measured=_num(d["measured_rtn"]),
                            measured_noise=_num(d.get("measured_noise")),
                            measured_noise_stderr=_num(d.get("measured_noise_stderr"))))
    if not out:
        raise ConfigError("no predictions given")
    return out


def prediction_vs_measured(items: Any, *, show_noise: bool = True, title: str | None = None) -> go.Figure:
    """Predicted (``½ Σ σᵢ² Hᵢᵢ``) vs measured loss increase of weight PTQ, with the identity line.

    Points on the diagonal mean the second-order noise model explains the damage. Hollow markers
    (``show_noise``) show the increase under uniform noise of the same variance.

    Args:
        items: see :func:`prediction_rows`.
    """
    rows = prediction_rows(items)
    fig = go.Figure()
    symbols = ("circle", "square", "diamond", "triangle-up", "star", "cross")
    bits = sorted({r["w_bits"] for r in rows})
    for name in dict.fromkeys(r["name"] for r in rows):
        sub = [r for r in rows if r["name"] == name]
        err = [r["predicted_stderr"] or 0.0 for r in sub]
        fig.add_scatter(
            x=[r["predicted"] for r in sub], y=[r["measured"] for r in sub], mode="markers", name=name,
            marker=dict(size=11, color=method_color(name), symbol=[symbols[bits.index(r["w_bits"]) % 6] for r in sub]),
            error_x=dict(type="data", array=err, visible=any(err)),
            customdata=[[r["w_bits"]] for r in sub],
            hovertemplate=f"{name}, W%{{customdata[0]}} round-to-nearest<br>predicted increase %{{x:.4g}} nats"
                          "<br>measured increase %{y:.4g} nats<extra></extra>")
        if show_noise and any(r["measured_noise"] is not None for r in sub):
            fig.add_scatter(
                x=[r["predicted"] for r in sub], y=[r["measured_noise"] for r in sub], mode="markers",
                name=f"{name} · uniform noise", legendgroup=name,
                marker=dict(size=9, color="rgba(0,0,0,0)", line=dict(color=method_color(name), width=2),
                            symbol=[symbols[bits.index(r["w_bits"]) % 6] for r in sub]),
                error_y=dict(type="data", array=[r["measured_noise_stderr"] or 0.0 for r in sub]),
                customdata=[[r["w_bits"]] for r in sub],
                hovertemplate=f"{name}, W%{{customdata[0]}} uniform noise of the same variance<br>"
                              "predicted %{x:.4g} nats<br>measured %{y:.4g} nats<extra></extra>")
    vals = [v for r in rows for v in (r["predicted"], r["measured"], r["measured_noise"]) if v is not None]
    lo, hi = (min(vals + [0.0]), max(vals + [0.0])) if vals else (0.0, 1.0)
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="prediction = measurement",
                    line=dict(color="#999999", dash="dash"), hoverinfo="skip")
    return _styled(fig, title or "Predicted vs measured PTQ loss increase",
                   xaxis_title="predicted loss increase ½ Σ σᵢ² Hᵢᵢ (nats)",
                   yaxis_title="measured loss increase after PTQ (nats)")


# ---------------------------------------------------------------------------------- saving

STATIC_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a plain name (not mkstemp, which makes files private) so the result has the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _static_image(fig: go.Figure, fmt: str, scale: float) -> bytes:
    """Render through kaleido. kaleido >= 1 drives a Chrome/Chromium; if it has none of its own, point it
    at a system Chromium found on PATH (BROWSER_PATH is what its browser finder reads)."""
    try:
        import kaleido  # noqa: F401
    except ImportError as e:
        raise RuntimeError("kaleido is not installed (pip install kaleido; it also needs Chrome or Chromium)") from e
    if not os.environ.get("BROWSER_PATH"):
        found = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
        if found:
            os.environ["BROWSER_PATH"] = found
    return pio.to_image(fig, format=fmt, scale=scale)


def save_figure(fig: go.Figure, path_stem: str | os.PathLike, formats: Sequence[str] = ("html", "png"), *,
                scale: float = 2.0, include_plotlyjs: bool | str = True) -> dict[str, Path]:
    """Save ``fig`` as ``<path_stem>.<fmt>`` for each format; every file is written atomically.

    ``html`` is interactive and self-contained (plotly.js embedded, so it opens offline); ``json``
    is the figure spec (``plotly.io.read_json`` reopens it); static formats (png, svg, pdf, jpeg,
    webp) need kaleido and a Chrome/Chromium. When a static image cannot be made, a warning says
    why and the figure is saved as HTML and JSON instead, so nothing is lost.

    Returns:
        ``{format: path}`` of the files written (fallback files under 'html'/'json').

    Raises:
        ConfigError: an unknown format.
    """
    stem = Path(path_stem)
    if stem.suffix.lstrip(".") in ("html", "json", *STATIC_FORMATS):
        stem = stem.with_suffix("")  # "fig.png" -> "fig": the formats decide the suffixes
    fmts = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in fmts if f not in ("html", "json", *STATIC_FORMATS)]
    if unknown or not fmts:
        raise ConfigError(f"unknown figure format(s) {unknown}; use html, json or {', '.join(STATIC_FORMATS)}")
    fig = go.Figure(fig)  # a FigureWidget writes the same, but a plain Figure needs no kernel
    out: dict[str, Path] = {}
    fallback_reason: str | None = None
    for fmt in dict.fromkeys(fmts):
        path = stem.with_name(f"{stem.name}.{fmt}")
        if fmt == "html":
            out[fmt] = _atomic_write(path, lambda p: fig.write_html(str(p), include_plotlyjs=include_plotlyjs,
                                                                   full_html=True))
        elif fmt == "json":
            out[fmt] = _atomic_write(path, lambda p: p.write_text(fig.to_json(), encoding="utf-8"))
        elif fallback_reason is None:
            try:
                data = _static_image(fig, fmt, scale)
            except Exception as e:  # kaleido missing, no browser, browser crashed: all mean "no static image"
                fallback_reason = f"{type(e).__name__}: {e}".strip()
                log.warning("cannot write %s (%s); saving HTML and JSON instead", path.name, fallback_reason)
                continue
            out[fmt] = _atomic_write(path, lambda p, data=data: p.write_bytes(data))
    if fallback_reason is not None:
        for fmt in ("html", "json"):
            if fmt not in out:
                out.update(save_figure(fig, stem, (fmt,), include_plotlyjs=include_plotlyjs))
    return out


# ----------------------------------------------------------------------------- mixed precision


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
    return _styled(fig, title, barmode="group", xaxis_title="layer", yaxis_title="weight bits",
                   xaxis_tickangle=-45)
