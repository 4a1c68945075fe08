"""Figures: traces, names, values and axis titles match the tables they are built from; saving writes files."""

from __future__ import annotations

import logging
import math
import os
import shutil

import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from workbench import errormodel, models, plots
from workbench.errors import ConfigError
from workbench.flatness import DensityResult, QuantPrediction
from workbench.landscape import Landscape1D, Landscape2D
from workbench.train import TrainResult


def _history(method: str, accs: list[float]) -> list[dict]:
    return [{"epoch": e + 1, "train_loss": 2.0 / (e + 1), "test_loss": 2.2 / (e + 1), "test_accuracy": a,
             "epoch_time": 0.1, "method": method} for e, a in enumerate(accs)]


def _sweep_rows() -> list[dict]:
    rows = []
    for method, base in (("plain", 80.0), ("dnq", 82.0)):
        rows.append(dict(checkpoint=f"runs/{method}/model.pt", method=method, config="FP32", w_bits=None,
                         a_bits=None, observer=None, accuracy=base, loss=0.5))
        for b, drop in ((8, 0.1), (4, 5.0), (3, 30.0)):
            rows.append(dict(checkpoint=f"runs/{method}/model.pt", method=method, config=f"W{b}A{b}", w_bits=b,
                             a_bits=b, observer="minmax", accuracy=base - drop / (2 if method == "dnq" else 1),
                             loss=0.5 + drop / 10))
    return rows


def _trace(fig: go.Figure, name: str) -> go.BaseTraceType:
    found = [t for t in fig.data if t.name == name]
    assert found, f"no trace {name!r} in {[t.name for t in fig.data]}"
    return found[0]


# ---------------------------------------------------------------------------------- inputs and style


def test_empty_table_and_missing_column_say_what_is_expected():
    with pytest.raises(ConfigError, match="empty.*epoch, train_loss"):
        plots.training_curves([])
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['test_accuracy'\]"):
        plots.training_curves([{"epoch": 1, "train_loss": 1.0, "test_loss": 1.0}])
    with pytest.raises(ConfigError, match="accuracy"):
        plots.accuracy_vs_bits([{"method": "dnq", "w_bits": 4, "a_bits": 4}])
    with pytest.raises(ConfigError, match="list of dict rows"):
        plots.layer_error_bars({"layer": "fc"})


def test_dataframe_like_tables_are_accepted_without_pandas():
    class FakeFrame:  # what as_rows relies on: .columns and .to_dict("records")
        columns = ("epoch", "train_loss", "test_loss", "test_accuracy")

        def to_dict(self, orient):
            assert orient == "records"
            return _history("sam", [50.0, 60.0])

    fig = plots.training_curves(FakeFrame())
    assert _trace(fig, "sam · test accuracy").y == (50.0, 60.0)


def test_method_colours_are_fixed_and_shared_across_figures():
    assert plots.method_color("dnq") == plots.METHOD_COLORS["dnq"]
    assert plots.method_color("runs/dnq/model.pt") == plots.METHOD_COLORS["dnq"]
    assert plots.method_color("my-custom") == plots.method_color("my-custom")  # stable hash, not hash()
    curves = plots.training_curves(_history("dnq", [50.0]))
    sweep = plots.accuracy_vs_bits(_sweep_rows())
    assert _trace(curves, "dnq · train loss").line.color == plots.METHOD_COLORS["dnq"]
    assert _trace(sweep, "dnq/model.pt").line.color == plots.METHOD_COLORS["dnq"]
    assert curves.layout.template.layout.font.size == plots.template().layout.font.size


# ---------------------------------------------------------------------------------- training curves


def test_training_curves_overlay_runs_with_values_from_the_table():
    rows = _history("plain", [40.0, 55.0, 61.0]) + _history("dnq", [42.0, 58.0, 66.0])
    fig = plots.training_curves(rows)
    assert len(fig.data) == 6  # 2 runs x (train loss, test loss, test accuracy)
    acc = _trace(fig, "dnq · test accuracy")
    assert acc.x == (1, 2, 3) and acc.y == (42.0, 58.0, 66.0)
    assert _trace(fig, "plain · test loss").line.dash == "dash"
    assert acc.xaxis == "x2"  # the accuracy panel
    assert fig.layout.xaxis.title.text == "epoch"
    assert "nats" in fig.layout.yaxis.title.text and "%" in fig.layout.yaxis2.title.text
    assert "epoch" in acc.hovertemplate and "dnq" in acc.hovertemplate


def test_training_curves_take_a_mapping_of_train_results():
    res = TrainResult(history=_history("dnq", [50.0, 60.0]), metrics={})
    fig = plots.training_curves({"dnq k=1": res, "dnq k=2": _history("dnq", [45.0, 50.0])})
    assert _trace(fig, "dnq k=2 · test accuracy").y == (45.0, 50.0)
    assert _trace(fig, "dnq k=1 · train loss").line.color == plots.METHOD_COLORS["dnq"]


# ---------------------------------------------------------------------------------- error histograms


def test_error_histogram_is_a_density_with_both_models():
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(5000, generator=g) - 0.5  # rounding error in units of the step
    fig = plots.error_histogram(samples, normalized=True, noise_mult=2.0, layer="fc", kind="wqe", bits=4)
    names = [t.name for t in fig.data]
    assert names == ["measured error", "Gaussian model N(0, Δ²/12)", "uniform model U(-Δ/2, Δ/2)",
                     "injected noise, k = 2"]
    bar = fig.data[0]
    assert sum(bar.y) * bar.width == pytest.approx(1.0, rel=1e-6)
    assert sum(bar.customdata) == 5000
    sigma = 1 / math.sqrt(12)
    assert max(fig.data[1].y) == pytest.approx(1 / (sigma * math.sqrt(2 * math.pi)), rel=1e-3)
    assert max(fig.data[2].y) == pytest.approx(1.0)  # uniform on [-1/2, 1/2]
    assert max(fig.data[3].y) == pytest.approx(1 / (2 * sigma * math.sqrt(2 * math.pi)), rel=1e-3)
    assert "Δ" in fig.layout.xaxis.title.text and fig.layout.yaxis.title.text == "probability density"
    assert "WQE of fc at 4 bits" in fig.layout.title.text


def test_error_histogram_from_real_samples_and_bad_input():
    model = models.create("cnn-small", num_classes=10, in_chans=1, img_size=28, width=8)
    layer = errormodel.measure(model, [], 4, None)[0]
    raw = errormodel.error_samples(model, None, layer["layer"], "wqe", 4, n=2000)
    fig = plots.error_histogram(raw, pred_std=layer["pred_std"], kind="wqe", layer=layer["layer"], bits=4)
    assert sum(fig.data[0].customdata) == len(raw)
    assert "tensor units" in fig.layout.xaxis.title.text
    with pytest.raises(ConfigError, match="step"):
        plots.error_histogram(raw)
    with pytest.raises(ConfigError, match="no samples"):
        plots.error_histogram([], step=1.0)


# ---------------------------------------------------------------------------------- per-layer errors


@pytest.fixture(scope="module")
def measured():
    model = models.create("cnn-small", num_classes=10, in_chans=1, img_size=28, width=8)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return errormodel.measure(model, [x], 4, 6, max_samples=5000)


def test_layer_error_bars_show_measured_and_predicted_per_layer(measured):
    fig = plots.layer_error_bars(measured)
    wqe = [r for r in measured if r["kind"] == "wqe"]
    meas = _trace(fig, "measured WQE std")
    assert list(meas.x) == [r["layer"] for r in wqe]
    assert list(meas.y) == pytest.approx([r["std"] for r in wqe])
    assert list(_trace(fig, "model Δ/√12 (WQE)").y) == pytest.approx([r["pred_std"] for r in wqe])
    aqe = _trace(fig, "measured AQE std")
    assert aqe.yaxis == "y2" and len(aqe.x) == sum(r["kind"] == "aqe" for r in measured)
    assert fig.layout.yaxis.type == "log" and "std" in fig.layout.yaxis.title.text
    assert "ratio" in meas.hovertext[0] and wqe[0]["layer"] in meas.hovertext[0]
    ratio = plots.layer_error_bars(measured, value="ratio")
    assert list(_trace(ratio, "WQE measured / model").y) == pytest.approx([r["ratio"] for r in wqe])
    assert any(s.y0 == 1.0 for s in ratio.layout.shapes)  # the reference line
    with pytest.raises(ConfigError, match="pred_std"):
        plots.layer_error_bars([{"layer": "fc", "kind": "wqe", "std": 1.0}])


# ---------------------------------------------------------------------------------- PTQ


def test_accuracy_vs_bits_one_line_per_model_with_fp_reference():
    rows = _sweep_rows()
    fig = plots.accuracy_vs_bits(rows)
    dnq = _trace(fig, "dnq/model.pt")
    assert dnq.x == (3, 4, 8)
    assert dnq.y == tuple(r["accuracy"] for r in sorted(rows, key=lambda r: r["w_bits"] or 0)
                          if r["method"] == "dnq" and r["w_bits"])
    fp = _trace(fig, "plain/model.pt · FP32")
    assert set(fp.y) == {80.0} and fp.line.dash == "dot"
    assert fig.layout.xaxis.title.text == "bit width (weights = activations)"
    assert fig.layout.yaxis.title.text == "top-1 accuracy (%)"
    assert "W4A4" in dnq.hovertext[1] and "minmax" in dnq.hovertext[1]
    # two observers: the name says which, the dash differs
    more = rows + [dict(r, observer="percentile", accuracy=r["accuracy"] + 1) for r in rows if r["w_bits"]]
    fig2 = plots.accuracy_vs_bits(more)
    assert _trace(fig2, "dnq/model.pt · percentile").line.dash == "dash"
    # mixed widths: x = weight bits, one line per activation width
    mixed = [dict(r, a_bits=8) for r in rows if r["w_bits"]] + rows
    fig3 = plots.accuracy_vs_bits(mixed, metric="loss")
    assert fig3.layout.xaxis.title.text == "weight bits"
    assert _trace(fig3, "dnq/model.pt · A8").y[0] == 0.5 + 3.0
    assert "loss" in fig3.layout.yaxis.title.text


def test_wqe_vs_aqe_plot_lines_per_quantized_kind():
    rows = [dict(bits=None, quantized="none", accuracy=80.0)]
    for b in (8, 4):
        rows += [dict(bits=b, quantized=k, accuracy=80.0 - d / b) for k, d in
                 (("weights", 4), ("activations", 8), ("both", 12))]
    fig = plots.wqe_vs_aqe_plot(rows)
    assert [t.name for t in fig.data] == ["weights quantized", "activations quantized", "both quantized"]
    assert fig.data[1].x == (4, 8) and fig.data[1].y == (78.0, 79.0)


# ---------------------------------------------------------------------------------- flatness and landscapes


def test_eigen_density_overlays_models_and_marks_top_eigenvalues():
    d = DensityResult(grid=(0.0, 1.0, 2.0), density=(0.5, 0.0, 0.25), nodes=((0.0, 2.0),), weights=((0.7, 0.3),),
                      runs=1, lanczos_steps=2, sigma=0.1, hvps=2, seconds=0.0)
    fig = plots.eigen_density({"plain": d, "dnq": d.to_dict()}, eigenvalues={"dnq": [2.0]})
    assert [t.name for t in fig.data] == ["plain", "dnq", "dnq · top eigenvalues"]
    assert fig.data[0].x == (0.0, 1.0, 2.0) and fig.data[0].y[0] == 0.5 and fig.data[0].y[1] > 0  # log floor
    assert fig.layout.yaxis.type == "log" and "eigenvalue" in fig.layout.xaxis.title.text
    assert plots.eigen_density(d, log_y=False).data[0].y == (0.5, 0.0, 0.25)
    with pytest.raises(ConfigError, match="grid"):
        plots.eigen_density({"x": {"density": [1.0]}})


def test_landscapes_1d_and_2d_follow_the_landscape_results():
    line = Landscape1D("random", (-1.0, 0.0, 1.0), (2.0, 0.5, 1.5), (10.0, 90.0, 40.0))  # accuracy in percent
    fig = plots.landscape_1d({"plain": line, "dnq": line.rows()})
    assert _trace(fig, "plain").y == (2.0, 0.5, 1.5) and _trace(fig, "dnq").x == (-1.0, 0.0, 1.0)
    assert "α" in fig.layout.xaxis.title.text and fig.layout.yaxis.title.text == "loss (nats)"
    acc = plots.landscape_1d(line, metric="accuracy")
    assert acc.data[0].y == pytest.approx((10.0, 90.0, 40.0)) and "%" in acc.layout.yaxis.title.text
    # losses[i][j] is at (alphas[i], betas[j]); plotly's z is indexed [beta][alpha]
    plane = Landscape2D((-1.0, 0.0, 1.0), (-1.0, 1.0), ((1.0, 2.0), (3.0, 4.0), (5.0, 6.0)),
                        ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0)))
    contour = plots.landscape_2d(plane)
    assert contour.data[0].type == "contour" and [list(r) for r in contour.data[0].z] == [[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]
    assert _trace(contour, "trained weights").x == (0.0,)
    surface = plots.landscape_2d(plane.to_dict(), kind="surface")
    assert surface.data[0].type == "surface" and surface.layout.scene.zaxis.title.text == "loss (nats)"
    with pytest.raises(ConfigError, match="3 x 2"):
        plots.landscape_2d({"alphas": [0, 1, 2], "betas": [0, 1], "losses": [[1, 2, 3], [4, 5, 6]]})


def _prediction(bits: int, predicted: float, measured: float) -> QuantPrediction:
    return QuantPrediction(w_bits=bits, sigma_trace=2 * predicted, sigma_trace_stderr=0.1, predicted=predicted,
                           predicted_stderr=0.05, measured_rtn=measured, measured_noise=predicted * 1.1,
                           measured_noise_stderr=0.01, clean_loss=0.5, quant_loss=0.5 + measured, clean_accuracy=90.0,
                           quant_accuracy=85.0, first_order=0.0, probes=10, converged=True, params=100, seconds=0.1)


def test_prediction_vs_measured_from_predictions_and_damage_rows():
    fig = plots.prediction_vs_measured({"plain": [_prediction(4, 0.2, 0.25), _prediction(3, 0.8, 1.0)],
                                        "dnq": _prediction(4, 0.1, 0.12)})
    plain = _trace(fig, "plain")
    assert plain.x == (0.2, 0.8) and plain.y == (0.25, 1.0) and plain.error_x.array == (0.05, 0.05)
    assert _trace(fig, "plain · uniform noise").y == pytest.approx((0.22, 0.88))
    ident = _trace(fig, "prediction = measurement")
    assert ident.x == ident.y
    assert "predicted" in fig.layout.xaxis.title.text and "nats" in fig.layout.yaxis.title.text
    damage = [{"model": "sam", "w_bits": 4, "predicted_increase": 0.3, "measured_increase": 0.4, "acc_drop": 1.0}]
    assert _trace(plots.prediction_vs_measured(damage), "sam").y == (0.4,)
    with pytest.raises(ConfigError, match="QuantPrediction"):
        plots.prediction_vs_measured({"x": {"predicted": 1.0}})


# ---------------------------------------------------------------------------------- saving


def test_save_figure_writes_html_and_json_atomically(tmp_path):
    fig = plots.training_curves(_history("dnq", [50.0, 60.0]))
    out = plots.save_figure(fig, tmp_path / "sub" / "curves", formats=("html", "json"))
    assert set(out) == {"html", "json"}
    assert "plotly" in out["html"].read_text(encoding="utf-8")[:100_000].lower()
    assert pio.read_json(str(out["json"])).data[1].name == "dnq · test loss"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["curves.html", "curves.json"]  # no temp files
    with pytest.raises(ConfigError, match="gif"):
        plots.save_figure(fig, tmp_path / "x", formats=("gif",))


def test_save_figure_falls_back_to_html_and_json_when_static_export_fails(tmp_path, monkeypatch, caplog):
    def broken(fig, fmt, scale):
        raise RuntimeError("no Chrome or Chromium found")

    monkeypatch.setattr(plots.export, "static_image", broken)
    fig = plots.accuracy_vs_bits(_sweep_rows())
    with caplog.at_level(logging.WARNING, logger="workbench.plots"):
        out = plots.save_figure(fig, tmp_path / "acc.png", formats=("png", "svg"))
    assert set(out) == {"html", "json"} and all(p.exists() for p in out.values())
    assert not (tmp_path / "acc.png").exists()
    assert "no Chrome or Chromium found" in caplog.text and "HTML and JSON" in caplog.text


@pytest.mark.slow
def test_save_figure_static_png_with_kaleido(tmp_path):
    pytest.importorskip("kaleido")
    if not (os.environ.get("BROWSER_PATH") or any(map(shutil.which, plots.BROWSER_NAMES))):
        pytest.skip("no Chrome/Chromium for kaleido")
    out = plots.save_figure(plots.training_curves(_history("dnq", [50.0])), tmp_path / "c", formats=("png",))
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
