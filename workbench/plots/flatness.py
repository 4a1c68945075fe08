"""Flatness in pictures: spectral densities, loss landscapes, predicted against measured damage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from ..errors import ConfigError
from .inputs import Rows, as_list, as_rows, num
from .style import method_color, styled


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
        grid = as_list(_field(d, "grid", f"density {name!r}"))
        dens = as_list(_field(d, "density", f"density {name!r}"))
        if not grid or len(grid) != len(dens):
            raise ConfigError(f"density {name!r}: grid and density must be non-empty and of equal length")
        fig.add_scatter(x=grid, y=[max(v, floor) for v in dens] if log_y else dens, mode="lines", name=name,
                        line=dict(color=method_color(name)),
                        hovertemplate=f"{name}<br>eigenvalue λ = %{{x:.4g}}<br>density %{{y:.3g}}<extra></extra>")
    for name, ev in (eigenvalues or {}).items():
        vals = as_list(ev.eigenvalues if hasattr(ev, "eigenvalues") else
                        ev["eigenvalues"] if isinstance(ev, Mapping) else ev)
        fig.add_scatter(x=vals, y=[floor if log_y else 0.0] * len(vals), mode="markers",
                        name=f"{name} · top eigenvalues", marker=dict(symbol="triangle-up", size=12,
                                                                      color=method_color(name)),
                        hovertemplate=f"{name}: top eigenvalue %{{x:.4g}}<extra></extra>", cliponaxis=False)
    styled(fig, title or "Hessian eigenvalue density", xaxis_title="Hessian eigenvalue λ (nats per unit² of weight)",
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
        acc = [num(r.get("accuracy")) for r in rows] if "accuracy" in rows[0] else None
        return [float(r["alpha"]) for r in rows], [num(r["loss"]) for r in rows], acc, rows[0].get("kind")
    alphas = as_list(_pick(obj, ("alphas", "alpha"), what))
    losses = as_list(_pick(obj, ("losses", "loss"), what))
    acc = _pick(obj, ("accuracies", "accuracy"), what, required=False)
    if len(alphas) != len(losses) or not alphas:
        raise ConfigError(f"{what}: alphas and losses must be non-empty and of equal length")
    return alphas, losses, (as_list(acc) if acc is not None else None), _pick(obj, ("kind",), what, False)


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
        y = loss if metric == "loss" else acc
        unit = "nats" if metric == "loss" else "%"
        fig.add_scatter(x=a, y=y, mode="lines+markers", name=name, line=dict(color=method_color(name)),
                        marker=dict(size=4),
                        hovertemplate=f"{name}<br>α = %{{x:.3g}}<br>{metric} %{{y:.4g}} {unit}<extra></extra>")
    line = kinds == {"line"}
    styled(fig, title or ("Loss on the line between two models" if line else
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
    a = as_list(_pick(surface, ("alphas", "alpha"), "2-D landscape"))
    b = as_list(_pick(surface, ("betas", "beta"), "2-D landscape"))
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
        styled(fig, title or "Loss landscape (contour)", xaxis_title="step α along direction 1",
                yaxis_title="step β along direction 2")
    else:
        fig = go.Figure(go.Surface(x=a, y=b, z=z, colorscale="Viridis", name="loss", hovertemplate=hover,
                                   colorbar=dict(title="loss (nats)")))
        styled(fig, title or "Loss landscape (surface)")
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
            out.append(dict(name=str(r["model"]), w_bits=r["w_bits"], predicted=num(r["predicted_increase"]),
                            predicted_stderr=None, measured=num(r["measured_increase"]), measured_noise=None,
                            measured_noise_stderr=None))
        return out
    for name, preds in _named(items, "predictions").items():
        for p in preds if isinstance(preds, (list, tuple)) else [preds]:
            d = p.to_dict() if hasattr(p, "to_dict") else dict(p)
            missing = [c for c in ("w_bits", "predicted", "measured_rtn") if c not in d]
            if missing:
                raise ConfigError(f"prediction {name!r} lacks {missing}; expected a flatness.QuantPrediction")
            out.append(dict(name=name, w_bits=d["w_bits"], predicted=num(d["predicted"]),
                            predicted_stderr=num(d.get("predicted_stderr")), measured=num(d["measured_rtn"]),
                            measured_noise=num(d.get("measured_noise")),
                            measured_noise_stderr=num(d.get("measured_noise_stderr"))))
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
    return styled(fig, title or "Predicted vs measured PTQ loss increase",
                   xaxis_title="predicted loss increase ½ Σ σᵢ² Hᵢᵢ (nats)",
                   yaxis_title="measured loss increase after PTQ (nats)")
