"""Widgets driven without a browser: set control values, check that the figure data follow."""

from __future__ import annotations

import pytest
import torch

from workbench import data, models, plots, widgets
from workbench.checkpoint import save_checkpoint
from workbench.errors import ConfigError, UnknownNameError
from workbench.train import TrainConfig, fit


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create("cnn-small", num_classes=10, in_chans=1, img_size=28, width=8)


@pytest.fixture(scope="module")
def tiny(mini: data.DataBundle) -> data.DataBundle:
    g = torch.Generator().manual_seed(0)
    tr = mini.train.subset(torch.randperm(len(mini.train), generator=g)[:256])
    te = mini.test.subset(torch.randperm(len(mini.test), generator=g)[:64])
    return data.DataBundle(mini.info, tr, te, tr.subset(torch.arange(32)), tr.subset(torch.arange(0)), seed=0,
                           params={"name": "fashion-mnist-mini", "subset": "widget tests"})


@pytest.fixture(scope="module")
def explorer(tiny: data.DataBundle) -> widgets.QuantExplorer:
    return widgets.QuantExplorer([("plain", _model(0)), ("dnq", _model(1), "dnq")], tiny, n_eval=64, n_calib=32)


def _ys(fig) -> list[tuple]:
    return [tuple(t.y) for t in fig.data]


# ---------------------------------------------------------------------------------- quantization explorer


def test_explorer_starts_with_every_model_at_the_initial_setting(explorer):
    assert explorer.setting == (8, 8, "minmax") and explorer.n_eval == 64
    fp, q = explorer.accuracy_figure.data
    assert fp.x == ("plain", "dnq") and q.name == "W8A8 minmax"
    assert q.y == tuple(explorer.result(n, 8, 8, "minmax")["accuracy"] for n in ("plain", "dnq"))
    assert fp.y == tuple(explorer.fp_result(n)["accuracy"] for n in ("plain", "dnq"))
    assert q.marker.color[1] == plots.METHOD_COLORS["dnq"]
    names = [t.name for t in explorer.layer_figure.data]
    assert names == ["plain · WQE", "plain · AQE", "dnq · WQE", "dnq · AQE"]
    wqe = [r for r in explorer.result("plain", 8, 8, "minmax")["layers"] if r["kind"] == "wqe"]
    assert explorer.layer_figure.data[0].x == tuple(r["layer"] for r in wqe)
    assert explorer.layer_figure.data[0].y == pytest.approx([100 * r["rel_error"] for r in wqe])
    assert "%" in explorer.layer_figure.layout.yaxis.title.text
    assert explorer.accuracy_figure.layout.yaxis.title.text == "top-1 accuracy (%)"


def test_explorer_sliders_update_the_figures_and_cache_results(explorer, monkeypatch):
    before = _ys(explorer.layer_figure)
    explorer.w_bits.value = 3
    after = _ys(explorer.layer_figure)
    assert after[0] != before[0]  # WQE per layer grows at 3 bits
    assert all(a > b for a, b in zip(after[0], before[0]))
    assert after[1][0] == pytest.approx(before[1][0])  # the image input is untouched by weight bits
    assert "W3A8" in explorer.layer_figure.layout.title.text
    assert explorer.accuracy_figure.data[1].name == "W3A8 minmax"
    assert ("plain", 3, 8, "minmax") in explorer._cache

    def no_recompute(*args, **kwargs):
        raise AssertionError("a cached setting was quantized again")

    monkeypatch.setattr(widgets, "quantize_model", no_recompute)
    explorer.w_bits.value = 8  # back to a cached setting: no quantization at all
    assert _ys(explorer.layer_figure) == before
    monkeypatch.undo()

    explorer.select.value = ("dnq",)  # one model from here on: half the work per move
    assert [t.name for t in explorer.layer_figure.data] == ["dnq · WQE", "dnq · AQE"]
    assert explorer.accuracy_figure.data[1].x == ("dnq",)
    explorer.a_bits.value = 3
    assert all(a > b for a, b in zip(_ys(explorer.layer_figure)[1], before[3]))
    minmax_aqe = _ys(explorer.layer_figure)[1]
    explorer.observer.value = "percentile"
    assert explorer.accuracy_figure.data[1].name == "W8A3 percentile"
    assert _ys(explorer.layer_figure)[1] != minmax_aqe  # clipping changes the activation error
    rows = explorer.results()
    assert {(r["checkpoint"], r["w_bits"], r["a_bits"], r["observer"]) for r in rows} >= {
        ("plain", None, None, None), ("dnq", 8, 3, "percentile"), ("plain", 3, 8, "minmax")}
    fig = plots.accuracy_vs_bits(rows, x="a_bits")  # the explorer's table feeds the sweep figure
    assert any(t.name.startswith("dnq") for t in fig.data)


def test_explorer_loads_checkpoints_and_rejects_bad_input(tiny, tmp_path):
    path = tmp_path / "dnq" / "model.pt"
    path.parent.mkdir()
    save_checkpoint(path, _model(2), data_info=tiny.info.to_dict(), method_config={"method": "dnq"})
    ex = widgets.QuantExplorer([path], tiny, n_eval=32, n_calib=16, w_bits=4, a_bits=8)
    assert ex.methods == {"dnq/model.pt": "dnq"}
    assert ex.accuracy_figure.data[1].x == ("dnq/model.pt",)
    assert isinstance(ex.widget.children[1], type(ex.accuracy_figure))  # figures in the VBox, not an HBox
    with pytest.raises(ConfigError, match="DataBundle"):
        widgets.QuantExplorer([("m", _model(0))])
    with pytest.raises(UnknownNameError, match="minmax"):
        widgets.QuantExplorer([("m", _model(0))], tiny, observer="nope")
    with pytest.raises(ConfigError, match="unique"):
        widgets.QuantExplorer([("m", _model(0)), ("m", _model(1))], tiny)


# ---------------------------------------------------------------------------------- noise lab


def test_noise_lab_follows_layer_bits_kind_and_noise_multiplier(tiny):
    calib = [x for x, _ in data.batches(tiny.calib, tiny.info, 16)]
    lab = widgets.NoiseLab(_model(0), calib, bits=4, n=2000)
    fig = lab.figure
    assert [t.name for t in fig.data][:3] == ["measured error", "Gaussian model N(0, Δ²/12)",
                                              "uniform model U(-Δ/2, Δ/2)"]
    assert fig.data[3].name == "injected noise, k = 1"
    assert sum(fig.data[0].customdata) == len(lab.samples())
    assert "WQE of features.0 at 4 bits" in fig.layout.title.text

    hist, model_curves = fig.data[0].y, _ys(fig)[1:3]
    lab.noise_mult.value = 2.0  # only the injected curve moves
    assert fig.data[3].name == "injected noise, k = 2"
    assert max(fig.data[3].y) == pytest.approx(max(_ys(fig)[1]) / 2, rel=1e-3)
    assert fig.data[0].y == hist and _ys(fig)[1:3] == model_curves

    lab.bits.value = 2
    assert "at 2 bits" in fig.layout.title.text and fig.data[0].y != hist
    lab.layer.value = lab.layer.options[-1]
    lab.kind.value = "aqe"
    assert f"AQE of {lab.layer.options[-1]}" in fig.layout.title.text
    assert len(lab._cache) == 4 and fig.data[3].name == "injected noise, k = 2"  # k survives redraws


def test_noise_lab_without_batches_offers_weights_only():
    lab = widgets.NoiseLab(_model(0), n=500)
    assert lab.kind.options == ("wqe",)
    with pytest.raises(ConfigError, match="AQE needs calibration batches"):
        widgets.NoiseLab(_model(0), kind="aqe")


# ---------------------------------------------------------------------------------- training monitor


def test_training_monitor_extends_curves_from_fit_callbacks(tiny):
    monitor = widgets.TrainingMonitor()
    cfg = TrainConfig(epochs=2, batch_size=64, device="cpu", augment=False, eval_batch_size=64)
    small = data.DataBundle(tiny.info, tiny.train.subset(torch.arange(128)), tiny.test, tiny.calib, tiny.val,
                            seed=0, params=tiny.params)
    res = fit(_model(0), small, cfg, progress=False, callbacks=[monitor.update])
    fig = monitor.figure
    assert [t.name for t in fig.data] == ["plain · train loss", "plain · test loss", "plain · test accuracy"]
    assert fig.data[0].x == (1, 2)
    assert fig.data[0].y == pytest.approx([r["train_loss"] for r in res.history])
    assert fig.data[2].y == pytest.approx([r["test_accuracy"] for r in res.history])
    assert fig.data[2].xaxis == "x2" and fig.layout.xaxis.title.text == "epoch"


def test_training_monitor_overlays_runs_by_method_and_name():
    monitor = widgets.TrainingMonitor()
    row = {"train_loss": 1.0, "test_loss": 1.2, "test_accuracy": 50.0}
    for e in (1, 2):
        monitor.update({**row, "epoch": e, "method": "dnq"})
    monitor.update({**row, "epoch": 1, "method": "dnq"})  # the counter restarts: a second dnq run
    cb = monitor.callback("sam rho=0.05")
    cb({**row, "epoch": 1, "method": "sam"})
    names = [t.name for t in monitor.figure.data]
    assert "dnq · train loss" in names and "dnq #2 · train loss" in names and "sam rho=0.05 · test loss" in names
    by_name = {t.name: t for t in monitor.figure.data}
    assert by_name["dnq · test accuracy"].x == (1, 2) and by_name["dnq #2 · test accuracy"].x == (1,)
    assert by_name["sam rho=0.05 · train loss"].line.color == plots.METHOD_COLORS["sam"]
    assert {r["run"] for r in monitor.history()} == {"dnq", "dnq #2", "sam rho=0.05"}
    assert len(plots.training_curves(monitor.history()).data) == len(monitor.figure.data)
    with pytest.raises(ConfigError, match="epoch"):
        monitor.update({"train_loss": 1.0})
