"""The quantization error model in pictures: error histograms against the Δ/√12 Gaussian, per-layer error bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import ConfigError
from .inputs import as_list, as_rows, hover_value, num
from .style import KIND_COLORS, MODEL_COLORS, styled


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
    xs = as_list(samples)
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
    styled(fig, title or f"{what or 'Quantization error'}: measured vs noise models", bargap=0,
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
        ratio = [num(r.get("ratio")) if r.get("ratio") is not None else
                 (num(r["std"]) / r["pred_std"] if r["pred_std"] else None) for r in sub]
        hover = [f"{r['layer']} ({kind.upper()}, {r.get('site', '')}, {r.get('bits', '?')} bits)<br>"
                 f"measured std {hover_value(num(r['std']))}<br>model Δ/√12 {hover_value(num(r['pred_std']))}<br>"
                 f"ratio {hover_value(q)}<br>excess kurtosis {hover_value(num(r.get('kurtosis')))} "
                 f"(Gaussian 0, uniform −1.2)<br>KS to Gaussian {hover_value(num(r.get('ks_gaussian')))}"
                 for r, q in zip(sub, ratio)]
        if value == "std":
            fig.add_bar(x=names, y=[num(r["std"]) for r in sub], name=f"measured {kind.upper()} std",
                        marker_color=KIND_COLORS.get(kind, "#555555"), hovertext=hover, hoverinfo="text",
                        row=i, col=1)
            fig.add_bar(x=names, y=[num(r["pred_std"]) for r in sub], name=f"model Δ/√12 ({kind.upper()})",
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
    return styled(fig, title or f"Per-layer quantization error vs the Δ/√12 model"
                                 f"{' at ' + '/'.join(map(str, bits)) + ' bits' if bits else ''}",
                   barmode="group", height=320 * len(kinds) + 80)
