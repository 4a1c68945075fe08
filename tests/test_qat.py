"""Quantization-aware training (``--method qat``, :mod:`workbench.lsq`): the learned-step
quantizers against the PTQ engine's and against LSQ's gradient in closed form, and a QAT run
that is saved, reloaded and evaluated as the quantized model it was trained to be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from workbench import cli, lsq, quant
from workbench.checkpoint import load_model
from workbench.ptq import PTQConfig, quantize_model, sweep_checkpoints


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1)], ids=["linear", "conv"])
def test_before_any_update_a_qat_layer_is_the_minmax_ptq_layer(layer: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g) if isinstance(layer, nn.Linear) else torch.randn(4, 3, 8, 8, generator=g)
    model = nn.Sequential(layer)
    ptq = quantize_model(model, PTQConfig(w_bits=3, a_bits=4), [x])
    lsq.attach(model, 3, 4)
    qlayer = ptq.model[0]

    def forward(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return layer._conv_forward(inp, w, layer.bias) if isinstance(layer, nn.Conv2d) else \
            nn.functional.linear(inp, w, layer.bias)

    with torch.no_grad():
        # same grids, same rounding, same min-max ranges: the same quantized weight and input
        assert torch.equal(layer.lsq_w(layer.weight), qlayer.weight_q)
        assert torch.equal(layer.lsq_in(x), qlayer.input_quant(x))
        assert torch.equal(model(x), forward(qlayer.input_quant(x), qlayer.weight_q))
        with lsq.disabled(model):
            assert torch.equal(model(x), forward(x, layer.weight))


def test_lsq_gradients_are_the_straight_through_and_step_gradients_in_closed_form() -> None:
    """LSQ (Esser et al. 2020, eq. 3): d x_q / d s = round(x/s) - x/s inside the grid and
    qmin or qmax where clipped; d x_q / d x = 1 inside, 0 outside. Zero point 0 here."""
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([-3.0, -0.74, -0.1, 0.26, 0.6, 1.9], dtype=torch.float64, requires_grad=True)
    qmin, qmax = quant.qrange(3, symmetric=True)  # [-3, 3]: -3.0 and 1.9 (3.8 steps) are clipped
    out = lsq.lsq_fake_quantize(x, s, 0.0, qmin, qmax, grad_scale=0.25)
    out.sum().backward()
    v = x.detach() / 0.5
    inside = (v >= qmin) & (v <= qmax)
    want_x = inside.double()
    want_s = torch.where(inside, torch.round(v) - v, v.clamp(qmin, qmax)).sum() * 0.25
    assert torch.equal(x.grad, want_x)
    torch.testing.assert_close(s.grad, want_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.detach(), quant.fake_quantize(x.detach(), quant.QParams(
        s.detach(), torch.zeros(()), qmin, qmax, 3, True)), rtol=0, atol=0)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qat") / "run"
    assert cli.main(["train", "--data", "digits", "--model", "cnn-small", "--model-arg", "width=8", "--method", "qat",
                     "--bits", "W3A4", "--epochs", "2", "--seed", "0", "--device", "cpu", "--no-progress",
                     "--out", str(out)]) == 0
    return out


def test_qat_run_saves_its_learned_steps_and_reloads_as_the_quantized_model(qat_run: Path) -> None:
    metrics = json.loads((qat_run / "metrics.json").read_text())
    assert {"test_accuracy", "fp_test_accuracy", "fp_test_loss"} <= set(metrics)
    model, ckpt = load_model(qat_run / "model.pt")
    steps = {k: v for k, v in ckpt["state_dict"].items() if ".lsq_" in k and k.endswith("step")}
    assert steps and lsq.bits(model) == (3, 4)
    # the steps were trained with the weights: the optimizer holds a state for every parameter
    last = torch.load(qat_run / "last.pt", weights_only=True)
    assert len(last["optimizer"]["state"]) == len(list(model.parameters())) > len(steps)
    assert all(bool(v) for k, v in ckpt["state_dict"].items() if k.endswith("lsq_in.initialized"))
    # reloaded, it scores what training reported, quantized and in full precision
    rows = sweep_checkpoints([qat_run / "model.pt"], [PTQConfig(w_bits=4, a_bits=4, n_calib=64)], progress=False)
    by = {(r["config"], r["ptq_method"]): r for r in rows}
    assert by[("W3A4", "qat")]["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert by[("FP32", None)]["accuracy"] == pytest.approx(metrics["fp_test_accuracy"], abs=1e-9)
    assert ("W4A4", "rtn") in by  # PTQ of the latent weights still works


def test_eval_reports_a_qat_model_quantized_and_in_full_precision(qat_run: Path, capsys) -> None:
    metrics = json.loads((qat_run / "metrics.json").read_text())
    assert cli.main(["eval", str(qat_run / "model.pt"), "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert got["fp_accuracy"] == pytest.approx(metrics["fp_test_accuracy"], abs=1e-9)
    assert got["qat_bits"] == [3, 4]


def test_qat_fine_tunes_a_parent_and_resumes_its_steps(qat_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    assert cli.main(["train", "--init", str(qat_run / "model.pt"), "--method", "qat", "--bits", "W3A4",
                     "--steps", "3", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["params"]["method"]["method"] == "qat" and run["params"]["init"]["method"] == "qat"
    model, _ = load_model(out / "model.pt")
    assert lsq.has_quantizers(model)


@pytest.mark.parametrize("bits", ["W1A4", "W4A1", "W17A4"])
def test_qat_at_an_impossible_bit_width_is_a_clear_error(bits: str, capsys, tmp_path, monkeypatch) -> None:
    # through the command a user types: refused before any data is read or folder made
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--method", "qat", "--bits", bits, "--epochs", "0.01", "--out", "never-made"])
    err = capsys.readouterr().err
    assert code != 0 and "out of range" in err and "2 to 16" in err
    assert not Path("never-made").exists()
