"""Training curves: loss and accuracy per epoch, one colour per run's method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import ConfigError
from .inputs import Rows, as_rows, num
from .style import method_color, styled

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
    return styled(fig, title, legend=dict(groupclick="togglegroup"))


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
                                      [num(r.get(metric)) for r in rows]), row=1, col=panel)
    return fig
