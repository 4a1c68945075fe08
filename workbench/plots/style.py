"""One look for every figure: the ``workbench`` plotly template and one colour per method."""

from __future__ import annotations

import zlib
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

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
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
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


def styled(fig: go.Figure, title: str | None, **layout: Any) -> go.Figure:
    fig.update_layout(template=template(), title=title, **layout)
    return fig
