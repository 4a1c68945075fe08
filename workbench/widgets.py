"""Notebook applications: ipywidgets controls driving plotly ``FigureWidget`` figures.

* :class:`QuantExplorer`: pick models, move weight/activation bit sliders and an observer;
  accuracy and per-layer quantization error update live (results cached per setting).
* :class:`NoiseLab`: one layer's real quantization error against the Gaussian model, with the
  injected-noise multiplier on a slider.
* :class:`TrainingMonitor`: live loss/accuracy curves; pass ``monitor.update`` to
  ``workbench.train.fit(..., callbacks=[monitor.update])``.

Each object has ``.widget`` (the ipywidgets box to display) and displays itself in a notebook.
Figures sit in a ``VBox``, never inside an ``HBox``: a FigureWidget in an HBox can render blank.
The logic needs no browser: set a slider's ``.value`` and the figure data change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn

from . import errormodel, plots
from .errors import ConfigError, UnknownNameError
from .noise import select_layers
from .ptq import OBSERVERS, PTQConfig, quantize_model
from .ptq.modules import ActQuantizer, QuantLayer
from .train import evaluate

log = logging.getLogger(__name__)

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class _App:
    """Display plumbing shared by the applications."""

    widget: W.Widget

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _take(batches: Iterable[Any], n: int) -> Batches:
    """The first ``n`` images of ``batches`` as a list of ``(x, y)`` (slicing the last batch)."""
    out: Batches = []
    seen = 0
    for b in batches:
        x, y = (b[0], b[1]) if isinstance(b, (tuple, list)) else (b, None)
        x = x[: n - seen]
        out.append((x, y[: len(x)] if y is not None else None))
        seen += len(x)
        if seen >= n:
            break
    return out


# ---------------------------------------------------------------------------------- training monitor


class TrainingMonitor(_App):
    """Loss and accuracy curves that grow as ``fit`` reports epochs; several runs overlaid.

    A row is drawn under ``row['run']``, else the name given to :meth:`callback`, else
    ``row['method']``. When a run's epoch counter starts again (a second run of the same method),
    a new run ``"<name> #2"`` begins instead of drawing over the first.

    Example::

        monitor = TrainingMonitor(); monitor          # display it, then
        fit(model, data, cfg, method, callbacks=[monitor.update])
    """

    def __init__(self, title: str | None = "Training monitor") -> None:
        self.figure = go.FigureWidget(plots.training_figure(title))
        self.widget = self.figure
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self._traces: dict[tuple[str, str], int] = {}
        self._alias: dict[str, str] = {}  # name given by the caller -> run currently drawn for it

    def callback(self, run: str) -> Callable[[dict[str, Any]], None]:
        """A callback that files rows under ``run`` (for two runs of one method)."""
        return lambda row: self.update(row, run=run)

    def update(self, row: Mapping[str, Any], run: str | None = None) -> None:
        """Add one epoch's history row (``epoch`` plus any of the metrics of :data:`plots.CURVES`)."""
        if "epoch" not in row:
            raise ConfigError(f"a history row needs 'epoch'; got columns {sorted(row)}")
        name = str(row.get("run") or run or row.get("method") or "run")
        current = self._alias.get(name, name)
        prev = self.rows.get(current)
        if prev and row["epoch"] <= prev[-1]["epoch"]:  # the counter restarted: a new run
            i = 2
            while f"{name} #{i}" in self.rows:
                i += 1
            current = f"{name} #{i}"
        self._alias[name] = current
        self.rows.setdefault(current, []).append(dict(row))
        method = self.rows[current][0].get("method")
        new = [(m, p) for m, p, _, _ in plots.CURVES if m in row and (current, m) not in self._traces]
        for metric, panel in new:  # adding traces cannot happen inside batch_update
            self.figure.add_trace(plots.curve_trace(current, metric, method), row=1, col=panel)
            self._traces[(current, metric)] = len(self.figure.data) - 1
        with self.figure.batch_update():
            for metric, *_ in plots.CURVES:
                if metric in row:
                    tr = self.figure.data[self._traces[(current, metric)]]
                    tr.x = tuple(tr.x or ()) + (row["epoch"],)
                    tr.y = tuple(tr.y or ()) + (plots.num(row[metric]),)

    __call__ = update

    def history(self) -> list[dict[str, Any]]:
        """All rows received, with a ``run`` column (for :func:`plots.training_curves`)."""
        return [{**r, "run": run} for run, rows in self.rows.items() for r in rows]


# ---------------------------------------------------------------------------------- noise lab


class NoiseLab(_App):
    """One layer's measured quantization error (in units of its step Δ) against the models.

    Controls: layer, error kind (WQE; AQE when calibration batches are given), bit width, and the
    noise multiplier ``k`` of the injected Gaussian ``N(0, (k·Δ/√12)²)``. Moving ``k`` only redraws
    that curve; samples are cached per (layer, kind, bits).

    Args:
        model: any model with Linear/Conv layers.
        batches: calibration batches (``(x, y)`` or images) for AQE; ``None`` = weights only.
        layers: layer names to offer (default: every Linear/Conv).
        n: error samples per histogram.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any] | None = None, *,
                 layers: Sequence[str] | None = None, kind: str = "wqe", bits: int = 4, noise_mult: float = 1.0,
                 n: int = 10_000, max_batches: int = 2, nbins: int = 60, seed: int = 0) -> None:
        self.model = model
        self.batches = list(batches) if batches is not None else None
        names = list(layers) if layers is not None else [name for name, _ in select_layers(model)]
        if not names:
            raise ConfigError("NoiseLab needs at least one Linear/Conv layer")
        kinds = ["wqe", "aqe"] if self.batches else ["wqe"]
        if kind not in kinds:
            raise ConfigError(f"kind must be one of {kinds} (AQE needs calibration batches), got {kind!r}")
        self.n, self.max_batches, self.nbins, self.seed = n, max_batches, nbins, seed
        self._cache: dict[tuple[str, str, int], list[float]] = {}
        self.layer = W.Dropdown(options=names, value=names[0], description="layer")
        self.kind = W.ToggleButtons(options=kinds, value=kind, description="error")
        self.bits = W.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False)
        self.noise_mult = W.FloatSlider(value=noise_mult, min=0.05, max=4.0, step=0.05, description="noise k",
                                        readout_format=".2f")
        self.figure = go.FigureWidget(self._static_figure())
        self.widget = W.VBox([W.HBox([self.layer, self.kind]), W.HBox([self.bits, self.noise_mult]), self.figure])
        for w in (self.layer, self.kind, self.bits):
            w.observe(self._on_data_change, names="value")
        self.noise_mult.observe(self._on_noise_change, names="value")

    def samples(self) -> list[float]:
        """Normalized errors (``(Q(t) - t) / Δ``) of the current layer, kind and bits (cached)."""
        key = (self.layer.value, self.kind.value, int(self.bits.value))
        if key not in self._cache:
            err = errormodel.error_samples(self.model, self.batches, key[0], key[1], key[2], n=self.n,
                                           max_batches=self.max_batches, normalized=True, seed=self.seed)
            self._cache[key] = err.float().tolist()
        return self._cache[key]

    def _static_figure(self) -> go.Figure:
        return plots.error_histogram(self.samples(), normalized=True, noise_mult=self.noise_mult.value,
                                     layer=self.layer.value, kind=self.kind.value, bits=self.bits.value,
                                     nbins=self.nbins)

    def _on_data_change(self, _change: Any = None) -> None:
        new = self._static_figure()
        with self.figure.batch_update():
            for trace, fresh in zip(self.figure.data, new.data):
                trace.update({k: v for k, v in fresh.to_plotly_json().items() if k not in ("type", "uid")})
            self.figure.layout.title = new.layout.title
            self.figure.layout.annotations = new.layout.annotations

    def _on_noise_change(self, _change: Any = None) -> None:
        bar = self.figure.data[0]
        lo, hi = bar.x[0] - bar.width / 2, bar.x[-1] + bar.width / 2
        fresh = plots.injected_trace(self.noise_mult.value, 1.0 / 12**0.5, lo, hi)  # sigma in steps
        with self.figure.batch_update():
            self.figure.data[3].update(x=fresh.x, y=fresh.y, name=fresh.name, hovertemplate=fresh.hovertemplate)


# ---------------------------------------------------------------------------------- quantization explorer


def _entries(models: Any) -> list[tuple[str, Any, str | None]]:
    """``(name, model or checkpoint path, method)`` from paths, ``(name, model[, method])`` or a dict."""
    if isinstance(models, (str, Path, nn.Module)):
        models = [models]
    if isinstance(models, Mapping):
        models = list(models.items())
    out: list[tuple[str, Any, str | None]] = []
    for m in models:
        if isinstance(m, (str, Path)):
            out.append((plots.run_label({"checkpoint": str(m)}), Path(m), None))
        elif isinstance(m, nn.Module):
            out.append((f"model {len(out) + 1}", m, None))
        elif isinstance(m, (tuple, list)) and len(m) in (2, 3):
            out.append((str(m[0]), m[1], str(m[2]) if len(m) == 3 else None))
        else:
            raise ConfigError("models must be checkpoint paths, (name, model) / (name, model, method) pairs "
                              f"or {{name: model}}; got {type(m).__name__}")
    if not out:
        raise ConfigError("QuantExplorer needs at least one model or checkpoint")
    if len({n for n, _, _ in out}) != len(out):
        raise ConfigError(f"model names must be unique: {[n for n, _, _ in out]}")
    return out


class QuantExplorer(_App):
    """Accuracy and per-layer quantization error of one or more models under PTQ, live.

    Each setting (model, ``w_bits``, ``a_bits``, observer) is quantized with
    :func:`workbench.ptq.quantize_model` and evaluated on the first ``n_eval`` test images once,
    then cached, so going back to a setting is instant. The per-layer panel shows the relative
    error ``‖Q(t) − t‖ / ‖t‖`` of every quantized weight (WQE) and activation (AQE), measured on
    the quantized copy itself, so it reflects the observer's clipping.

    Args:
        models: checkpoint paths, ``(name, model)`` / ``(name, model, method)`` pairs, or ``{name: model}``.
        data: a ``DataBundle`` (test split for evaluation, calib split for calibration). Not needed
            with ``eval_batches`` and ``calib_batches``, or with checkpoints (their dataset is loaded).
        n_eval, n_calib: images used for evaluation and calibration (small = fast sliders).
    """

    def __init__(self, models: Any, data: Any = None, *, eval_batches: Iterable[Any] | None = None,
                 calib_batches: Iterable[Any] | None = None, n_eval: int = 500, n_calib: int = 64,
                 batch_size: int = 250, w_bits: int = 8, a_bits: int = 8, observer: str = "minmax",
                 bit_range: tuple[int, int] = (2, 8), device: str | torch.device = "cpu") -> None:
        if n_eval < 1 or n_calib < 1:
            raise ConfigError(f"n_eval and n_calib must be >= 1, got {n_eval}, {n_calib}")
        if observer not in OBSERVERS:
            raise UnknownNameError(OBSERVERS.unknown_message(observer))
        self.device = torch.device(device)
        self.n_calib = n_calib
        self.models: dict[str, nn.Module] = {}
        self.methods: dict[str, str] = {}
        for name, m, method in _entries(models):
            if isinstance(m, Path):
                m, data, method = self._load_checkpoint(m, data, method)
            self.models[name] = m.to(self.device).eval()
            self.methods[name] = method or name
        if eval_batches is None or calib_batches is None:
            if data is None:
                raise ConfigError("give data (a DataBundle) or both eval_batches and calib_batches")
            from .data import batches

            eval_batches = eval_batches or batches(data.test, data.info, batch_size, limit=n_eval)
            calib_batches = calib_batches or batches(data.calib if len(data.calib) else data.train, data.info,
                                                     batch_size, limit=n_calib)
        self.eval_batches = [(x.to(self.device), y.to(self.device)) for x, y in _take(eval_batches, n_eval)]
        self.calib_batches = [x.to(self.device) for x, _ in _take(calib_batches, n_calib)]
        if not self.eval_batches or self.eval_batches[0][1] is None:
            raise ConfigError("eval_batches must yield (images, labels)")
        self.n_eval = sum(len(y) for _, y in self.eval_batches)
        self._cache: dict[tuple[str, int, int, str], dict[str, Any]] = {}
        self._fp: dict[str, dict[str, float]] = {}

        names = list(self.models)
        lo, hi = bit_range
        self.select = W.SelectMultiple(options=names, value=tuple(names), description="models",
                                       rows=min(6, max(2, len(names))))
        self.w_bits = W.IntSlider(value=w_bits, min=lo, max=hi, description="weight bits", continuous_update=False,
                                  style={"description_width": "initial"})
        self.a_bits = W.IntSlider(value=a_bits, min=lo, max=hi, description="activation bits",
                                  continuous_update=False, style={"description_width": "initial"})
        self.observer = W.Dropdown(options=OBSERVERS.names(), value=observer, description="observer")
        self.status = W.HTML()
        self.accuracy_figure = go.FigureWidget(self._accuracy_layout())
        self.layer_figure = go.FigureWidget(self._layer_layout())
        controls = W.HBox([self.select, W.VBox([self.w_bits, self.a_bits, self.observer, self.status])])
        self.widget = W.VBox([controls, self.accuracy_figure, self.layer_figure])
        for w in (self.select, self.w_bits, self.a_bits, self.observer):
            w.observe(self.refresh, names="value")
        self.refresh()

    # -- data ---------------------------------------------------------------------------
    @staticmethod
    def _load_checkpoint(path: Path, data: Any, method: str | None) -> tuple[nn.Module, Any, str | None]:
        from .checkpoint import load_model
        from .data import DataInfo, load

        model, ckpt = load_model(path)
        method = method or (ckpt.get("method_config") or {}).get("method")
        if data is None:
            if not ckpt.get("data_info"):
                raise ConfigError(f"{path} records no dataset: pass data=")
            data = load(DataInfo.from_dict(ckpt["data_info"]).name)
        return model, data, method

    @property
    def setting(self) -> tuple[int, int, str]:
        """The current ``(w_bits, a_bits, observer)``."""
        return int(self.w_bits.value), int(self.a_bits.value), str(self.observer.value)

    def fp_result(self, name: str) -> dict[str, float]:
        """Full-precision accuracy and loss of one model on the evaluation images (cached)."""
        if name not in self._fp:
            self._fp[name] = evaluate(self.models[name], self.eval_batches, self.device)
        return self._fp[name]

    def result(self, name: str, w_bits: int, a_bits: int, observer: str) -> dict[str, Any]:
        """Accuracy, loss and per-layer errors of one model at one setting (computed once, then cached)."""
        key = (name, int(w_bits), int(a_bits), observer)
        if key not in self._cache:
            cfg = PTQConfig(w_bits=key[1], a_bits=key[2], observer=observer, n_calib=self.n_calib)
            qm = quantize_model(self.models[name], cfg, self.calib_batches, device=self.device)
            layers, hooks = _activation_error_hooks(qm)
            try:
                metrics = evaluate(qm, self.eval_batches, self.device)
            finally:
                for h in hooks:
                    h.remove()
            rows = _weight_errors(qm) + [
                dict(layer=n, kind="aqe", bits=key[2], rel_error=(s["err"] / s["ref"]) ** 0.5 if s["ref"] else None)
                for n, s in layers.items()]
            self._cache[key] = dict(accuracy=metrics["accuracy"], loss=metrics["loss"], layers=rows)
        return self._cache[key]

    def results(self) -> list[dict[str, Any]]:
        """Every setting computed so far as ``ptq.sweep``-style rows (plots.accuracy_vs_bits takes them)."""
        rows = [dict(checkpoint=n, method=self.methods[n], w_bits=None, a_bits=None, observer=None,
                     accuracy=r["accuracy"], loss=r["loss"]) for n, r in self._fp.items()]
        rows += [dict(checkpoint=n, method=self.methods[n], w_bits=w, a_bits=a, observer=o, accuracy=r["accuracy"],
                      loss=r["loss"]) for (n, w, a, o), r in self._cache.items()]
        return rows

    # -- figures ------------------------------------------------------------------------
    def _accuracy_layout(self) -> go.Figure:
        fig = go.Figure()
        fig.add_bar(name="full precision", marker_color="#BBBBBB", hovertemplate="%{x}: full precision %{y:.2f}%"
                                                                              "<extra></extra>")
        fig.add_bar(name="quantized", textposition="outside", texttemplate="%{y:.1f}",
                    hovertemplate="%{x}: %{customdata} %{y:.2f}%<extra></extra>")
        plots.styled(fig, "Accuracy after PTQ", barmode="group", xaxis_title="model",
                      yaxis_title="top-1 accuracy (%)", yaxis_range=[0, 105], height=360)
        return fig

    def _layer_layout(self) -> go.Figure:
        fig = make_subplots(rows=2, cols=1, vertical_spacing=0.32,  # room for the rotated layer names
                            subplot_titles=("WQE: weight quantization error", "AQE: activation quantization error"))
        for i in (1, 2):
            fig.update_yaxes(title_text="relative error ‖Q(t)−t‖/‖t‖ (%)", row=i, col=1)
            fig.update_xaxes(title_text="layer", row=i, col=1)
        return plots.styled(fig, "Per-layer quantization error", barmode="group", height=760)

    def refresh(self, _change: Any = None) -> None:
        """Recompute (or fetch from the cache) the selected models at the current setting and redraw."""
        w, a, obs = self.setting
        names = list(self.select.value)
        label = f"W{w}A{a} {obs}"
        self.status.value = f"<i>computing {label}…</i>"
        res = {n: self.result(n, w, a, obs) for n in names}
        fp = {n: self.fp_result(n) for n in names}
        with self.accuracy_figure.batch_update():
            fp_bar, q_bar = self.accuracy_figure.data
            # name and colour are re-sent with the data: set only at build time they never reached
            # the browser's copy of the figure (seen in the JupyterLab end-to-end test)
            fp_bar.update(x=names, y=[fp[n]["accuracy"] for n in names], name="full precision",
                          marker_color="#BBBBBB")
            q_bar.update(x=names, y=[res[n]["accuracy"] for n in names], name=label, customdata=[label] * len(names),
                         marker_color=[plots.method_color(self.methods[n]) for n in names])
            self.accuracy_figure.layout.title = f"Accuracy after PTQ at {label} ({self.n_eval} test images)"
        fig = self.layer_figure
        fig.data = []  # the number of traces follows the selection
        for n in names:
            for row, kind in ((1, "wqe"), (2, "aqe")):
                sub = [r for r in res[n]["layers"] if r["kind"] == kind and r["rel_error"] is not None]
                fig.add_bar(x=[r["layer"] for r in sub], y=[100 * r["rel_error"] for r in sub],
                            name=f"{n} · {kind.upper()}", legendgroup=n,
                            marker_color=plots.method_color(self.methods[n]),
                            hovertemplate=f"{n}, {label}<br>%{{x}}: {kind.upper()} %{{y:.3g}}% of the tensor's "
                                          "norm<extra></extra>", row=row, col=1)
        fig.layout.title = f"Per-layer quantization error at {label}"
        self.status.value = f"{label}: " + ", ".join(f"{n} {res[n]['accuracy']:.1f}%" for n in names)


def _weight_errors(qm: Any) -> list[dict[str, Any]]:
    rows = []
    for name, m in qm.quant_layers():
        if isinstance(m, QuantLayer) and m.weight_q is not None:
            w = m.layer.weight.detach().float()
            rows.append(dict(layer=name, kind="wqe", bits=m.w_bits,
                             rel_error=float((m.weight_q.float() - w).norm() / w.norm().clamp_min(1e-12))))
    return rows


def _activation_error_hooks(qm: Any) -> tuple[dict[str, dict[str, float]], list[Any]]:
    """Forward hooks summing ``‖Q(x) − x‖²`` and ``‖x‖²`` of every activation quantizer."""
    stats: dict[str, dict[str, float]] = {}
    hooks = []
    for name, m in qm.model.named_modules():
        if isinstance(m, ActQuantizer) and m.mode == "quant":
            owner = name.rsplit(".", 1)[0] if "." in name else name
            label = owner if m.label == "input" else f"{owner} ({m.label})"
            s = stats.setdefault(label, {"err": 0.0, "ref": 0.0})

            def hook(mod, args, out, s=s):
                x = args[0].detach().float()
                s["err"] += float((out.detach().float() - x).pow(2).sum())
                s["ref"] += float(x.pow(2).sum())

            hooks.append(m.register_forward_hook(hook))
    return stats, hooks


# ---------------------------------------------------------------------------------- mixed precision


class BitBudget(_App):
    """A budget slider for curvature-guided mixed precision: moving it re-solves the allocation
    (:func:`workbench.ptq.allocate_bits`, instant: the curvature is estimated once) and redraws
    the bits per layer and the predicted loss increase; *measure* quantizes and evaluates the
    current allocation (cached per budget).

    Args:
        model: the model to quantize.
        sensitivities: from :func:`workbench.ptq.layer_sensitivities` (the slow part, done once).
        calib_batches, eval_batches: calibration images and ``(x, y)`` test batches.
    """

    def __init__(self, model: nn.Module, sensitivities: Sequence[Any], calib_batches: Iterable[Any],
                 eval_batches: Iterable[Any], *, a_bits: int = 8, observer: str = "mse", budget: float = 4.0,
                 candidates: Sequence[int] = (8, 6, 4, 3, 2), n_calib: int = 128) -> None:
        from .ptq.mixed import allocate_bits

        self._allocate = lambda b: allocate_bits(model, budget=b, candidates=candidates, a_bits=a_bits,
                                                 sensitivities=sensitivities)
        self.model, self.a_bits, self.observer, self.n_calib = model.eval(), a_bits, observer, n_calib
        self.calib = [b[0] if isinstance(b, (tuple, list)) else b for b in calib_batches]
        self.evals = [(x, y) for x, y in eval_batches]
        self.measured: dict[float, dict[str, float]] = {}
        lo, hi = min(candidates), max(candidates)
        self.budget = W.FloatSlider(value=min(max(budget, lo), hi), min=lo, max=hi, step=0.25,
                                    description="average weight bits", continuous_update=False,
                                    style={"description_width": "initial"})
        self.button = W.Button(description="measure accuracy")
        self.status = W.HTML()
        self.figure = go.FigureWidget(plots.bits_per_layer({}, title="Weight bits per layer"))
        self.figure.add_trace(go.Bar(name="bits"))
        self.budget.observe(lambda _change: self.redraw(), names="value")
        self.button.on_click(lambda _b: self.measure())
        self.widget = W.VBox([W.HBox([self.budget, self.button]), self.status, self.figure])
        self.redraw()

    def redraw(self) -> None:
        self.allocation = self._allocate(self.budget.value)
        a = self.allocation
        with self.figure.batch_update():
            self.figure.data[0].x = list(a.bits)
            self.figure.data[0].y = list(a.bits.values())
            self.figure.data[0].hovertext = [f"predicted +{r['predicted']:.5f}" for r in a.layers]
        measured = self.measured.get(self.budget.value)
        self.status.value = (f"budget {self.budget.value:g}: average {a.average_bits:.2f} weight bits, predicted loss "
                             f"increase {a.predicted:.4f} ± {a.predicted_stderr:.4f}"
                             + (f"; measured accuracy {measured['accuracy']:.2f} %" if measured else ""))

    def measure(self) -> dict[str, float]:
        """Quantize with the current allocation (activations at ``a_bits``) and evaluate."""
        b = self.budget.value
        if b not in self.measured:
            qm = quantize_model(self.model, self.allocation.config(observer=self.observer, n_calib=self.n_calib),
                                self.calib)
            self.measured[b] = evaluate(qm, self.evals)
        self.redraw()
        return self.measured[b]
