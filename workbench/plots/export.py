"""``save_figure``: interactive HTML and static images, written atomically, with an HTML + JSON
fallback when no static image can be made."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from ..errors import ConfigError
from ..files import atomic_write

log = logging.getLogger(__name__)

STATIC_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def static_image(fig: go.Figure, fmt: str, scale: float) -> bytes:
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
            out[fmt] = atomic_write(path, lambda p: fig.write_html(str(p), include_plotlyjs=include_plotlyjs,
                                                                   full_html=True))
        elif fmt == "json":
            out[fmt] = atomic_write(path, lambda p: p.write_text(fig.to_json(), encoding="utf-8"))
        elif fallback_reason is None:
            try:
                data = static_image(fig, fmt, scale)
            except Exception as e:  # kaleido missing, no browser, browser crashed: all mean "no static image"
                fallback_reason = f"{type(e).__name__}: {e}".strip()
                log.warning("cannot write %s (%s); saving HTML and JSON instead", path.name, fallback_reason)
                continue
            out[fmt] = atomic_write(path, lambda p, data=data: p.write_bytes(data))
    if fallback_reason is not None:
        for fmt in ("html", "json"):
            if fmt not in out:
                out.update(save_figure(fig, stem, (fmt,), include_plotlyjs=include_plotlyjs))
    return out
