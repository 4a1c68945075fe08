"""Tests of the PTQ engine against independent references (integer arithmetic, numpy percentiles)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench import quant
from workbench.errors import CheckpointError, ConfigError, DataError, UnknownNameError
from workbench.ptq import (
    FLOAT_OPS,
    OBSERVERS,
    ActQuantizer,
    PTQConfig,
    QuantAttention,
    QuantConv,
    QuantLinear,
    configs_from_bits,
    make_observer,
    quantize_model,
    sweep,
    wqe_vs_aqe,
)
from workbench.quant import fused_fake_quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # non-trivial BN statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def images(n: int = 64, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# quantize-dequantize properties


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_qdq_error_idempotent_and_clamped(bits: int, symmetric: bool) -> None:
    x = torch.linspace(-3.0, 5.0, 10001)
    qp = quant.activation_qparams(-1.0, 2.0, bits, symmetric=symmetric)
    lo, hi = qp.lower(), qp.upper()
    zp = float(qp.zero_point)
    for fq in (quant.fake_quantize(x, qp),  # the reference primitive, and the run-time path
               fused_fake_quantize(x, qp.step, qp.qmin - zp, qp.qmax - zp)):
        inside = (x >= lo) & (x <= hi)
        fp32_slack = 4 * torch.finfo(torch.float32).eps * x.abs().max()  # matters at 16 bits only
        assert ((fq - x)[inside].abs() <= qp.step / 2 + fp32_slack).all()
        assert torch.allclose(quant.fake_quantize(fq, qp), fq, atol=1e-6 * float(qp.step))  # idempotent
        assert torch.allclose(fq[x < lo], lo.expand_as(fq[x < lo])) and torch.allclose(fq[x > hi], hi)
        assert float(fq.min()) >= float(lo) - 1e-6 and float(fq.max()) <= float(hi) + 1e-6


def test_act_quantizer_matches_primitive() -> None:
    aq = ActQuantizer(6, False, make_observer("minmax"))
    x = torch.randn(4000)
    aq(x)
    aq.freeze()
    qp = quant.activation_qparams(x.min(), x.max(), 6)
    assert torch.allclose(aq.scale, qp.step) and int(aq.zero_point) == int(qp.zero_point)
    assert torch.equal(aq(x), quant.fake_quantize(x, qp))  # bitwise: same arithmetic, fewer passes


def test_log2_quantizer() -> None:
    x = torch.rand(5000) ** 4  # many small probabilities
    for bits in (3, 4, 8):
        fq = quant.log2_fake_quantize(x, bits)
        qmax = 2**bits - 1
        nz = fq > 0
        assert torch.equal(torch.log2(fq[nz]), torch.round(torch.log2(fq[nz])))  # powers of two
        assert torch.equal(quant.log2_fake_quantize(fq, bits), fq)  # idempotent
        big = x >= 2.0 ** -(qmax - 1.5)  # inside the range: within half an octave
        ratio = fq[big] / x[big]
        assert (ratio >= 2**-0.5 - 1e-6).all() and (ratio <= 2**0.5 + 1e-6).all()
    assert float(quant.log2_fake_quantize(torch.tensor([0.0]), 4)) == 0.0


# ---------------------------------------------------------------------------------------
# fake quantization vs integer arithmetic


def _reference_act_qparams(calib: torch.Tensor, bits: int) -> quant.QParams:
    return quant.activation_qparams(calib.min(), calib.max(), bits)  # min-max, asymmetric


@pytest.mark.parametrize("bits,per_channel", [(8, True), (8, False), (4, True), (3, False)])
def test_linear_equals_integer_matmul(bits: int, per_channel: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 12)
    calib = torch.randn(256, 24) * 2 + 0.5
    qm = quantize_model(nn.Sequential(lin), PTQConfig(w_bits=bits, a_bits=bits, w_per_channel=per_channel),
                        [calib])
    x = torch.randn(40, 24) * 2 + 0.5
    # independent reference: integer codes, int64 matmul, then scale
    qa = _reference_act_qparams(calib, bits)
    qw = quant.weight_qparams(lin.weight.detach(), bits, per_channel=per_channel)
    xc = quant.quantize(x, qa).long() - qa.zero_point.long()
    wc = quant.quantize(lin.weight.detach(), qw).long()
    acc = xc @ wc.t()  # (40, 12) int64
    ref = acc.double() * qa.step.double() * qw.step.double().reshape(1, -1) + lin.bias.detach().double()
    with torch.no_grad():
        out = qm(x)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("bits,per_channel", [(8, True), (4, False)])
def test_conv_equals_integer_conv(bits: int, per_channel: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    calib = torch.randn(32, 3, 9, 9).abs()  # one-sided (post-ReLU-like), zero point at 0
    calib[0, 0, 0, 0] = -0.1
    qm = quantize_model(nn.Sequential(conv), PTQConfig(w_bits=bits, a_bits=bits, w_per_channel=per_channel),
                        [calib])
    x = torch.randn(5, 3, 9, 9).abs()
    qa = _reference_act_qparams(calib, bits)
    qw = quant.weight_qparams(conv.weight.detach(), bits, per_channel=per_channel)
    xc = quant.quantize(x, qa).long() - qa.zero_point.long()  # zero-centred codes: padding 0 = real 0
    wc = quant.quantize(conv.weight.detach(), qw).long()
    cols = F.unfold(xc.double(), 3, padding=1, stride=2).round().long()  # (B, C*9, L), exact integers
    acc = wc.reshape(6, -1) @ cols  # (B, 6, L) int64 matmul
    ref = (acc.double() * qa.step.double() * qw.step.double().reshape(1, -1, 1)).reshape(5, 6, 5, 5)
    ref = ref + conv.bias.detach().double().reshape(1, -1, 1, 1)
    with torch.no_grad():
        out = qm(x)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------
# observers


def test_percentile_observer_matches_numpy() -> None:
    data = torch.randn(20000, generator=torch.Generator().manual_seed(0)) ** 3
    obs = make_observer("percentile", percentile=99.0)
    for chunk in data.split(5000):
        obs.update(chunk.reshape(50, 100))
    lo, hi = obs.activation_range(8, symmetric=False)
    assert float(lo) == pytest.approx(np.percentile(data.numpy(), 1.0), rel=1e-4)
    assert float(hi) == pytest.approx(np.percentile(data.numpy(), 99.0), rel=1e-4)
    lo_s, hi_s = obs.activation_range(8, symmetric=True)
    assert float(hi_s) == pytest.approx(np.percentile(np.abs(data.numpy()), 99.0), rel=1e-4)
    w = torch.randn(4, 50)
    per_ch = make_observer("percentile", percentile=90.0).weight_absmax(w, 4, per_channel=True)
    assert np.allclose(per_ch.flatten().numpy(), np.percentile(w.abs().numpy(), 90.0, axis=1), rtol=1e-5)


def test_mse_observer_beats_minmax() -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50000, generator=g)
    data[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, 50.0])  # outliers that ruin min-max
    errs = {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, sample_size=10**6)
        obs.update(data)
        lo, hi = obs.activation_range(4, symmetric=False)
        qp = quant.activation_qparams(lo, hi, 4)
        errs[name] = float((quant.fake_quantize(data, qp) - data).square().mean())
    assert errs["mse"] < errs["minmax"]
    w = torch.randn(8, 64, generator=g)
    w[0, 0] = 20.0
    for per_channel in (True, False):
        e = {}
        for name in ("minmax", "mse"):
            absmax = make_observer(name).weight_absmax(w, 4, per_channel)
            qp = quant.weight_qparams(w, 4, per_channel=per_channel, absmax=absmax)
            e[name] = float((quant.fake_quantize(w, qp) - w).square().mean())
        assert e["mse"] <= e["minmax"] + 1e-12


def test_unknown_observer_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="minmax, mse, percentile"):
        PTQConfig(observer="histogram")
    assert OBSERVERS.names() == ["minmax", "mse", "percentile"]


# ---------------------------------------------------------------------------------------
# conversion: original untouched, metadata, ViT attention


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("make", [tiny_vit, tiny_cnn])
def test_original_model_is_not_modified(make) -> None:
    model = make()
    model.train()
    before = _snapshot(model)
    qm = quantize_model(model, PTQConfig(w_bits=4, a_bits=4, observer="mse"), [images(32)])
    with torch.no_grad():
        qm(images(8))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise
    assert model.training and not qm.training
    assert not any(isinstance(m, (QuantLinear, QuantConv, QuantAttention)) for m in model.modules())


def test_describe_and_metadata_are_explicit() -> None:
    qm = quantize_model(tiny_vit(), PTQConfig(w_bits=4, a_bits=8, softmax_quantizer="log2"), [images(32)])
    rows = qm.describe()
    tensors = {r["tensor"] for r in rows}
    assert tensors == {"weight", "input", "q", "k", "v", "softmax"}
    assert all(r["bits"] == 4 for r in rows if r["tensor"] == "weight")
    assert all(r["granularity"] == "per-channel" for r in rows if r["tensor"] == "weight")
    assert {r["scheme"] for r in rows if r["tensor"] == "softmax"} == {"log2"}
    meta = qm.metadata()
    json.dumps(meta)  # plain data
    for op in ("LayerNorm", "softmax", "GELU"):
        assert any(op in f for f in meta["float_ops"])
    assert "floating point" in meta["note"] and meta["config"]["w_bits"] == 4
    assert "LayerNorm" in qm.summary()
    assert set(FLOAT_OPS) == set(meta["float_ops"])


def test_weights_only_and_first_last_8bit() -> None:
    qm = quantize_model(tiny_cnn(), PTQConfig(w_bits=4, a_bits=None))  # W4A32: no calibration needed
    rows = qm.describe()
    assert {r["tensor"] for r in rows} == {"weight"}
    assert qm.config.label == "W4A32"
    qm = quantize_model(tiny_cnn(), PTQConfig(w_bits=3, a_bits=3, first_last_8bit=True), [images(16)])
    w_bits = [r["bits"] for r in qm.describe() if r["tensor"] == "weight"]
    a_bits = [r["bits"] for r in qm.describe() if r["tensor"] == "input"]
    assert w_bits == [8, 3, 8] and a_bits == [8, 3, 8]


def test_vit_attention_is_replaced_and_16bit_matches_fp() -> None:
    model = tiny_vit()
    x = images(16)
    qm = quantize_model(model, PTQConfig(w_bits=16, a_bits=16), [x])
    assert sum(isinstance(m, QuantAttention) for m in qm.modules()) == 2
    with torch.no_grad():
        assert torch.allclose(qm(x), model(x), atol=1e-3)
        # attention quantization off: the timm blocks stay (fused attention path)
        q2 = quantize_model(model, PTQConfig(w_bits=16, a_bits=16, quant_attn=False), [x])
        assert not any(isinstance(m, QuantAttention) for m in q2.modules())
        assert torch.allclose(q2(x), model(x), atol=1e-3)


# ---------------------------------------------------------------------------------------
# config, sweeps, bad input


def test_config_roundtrip_and_validation() -> None:
    cfg = PTQConfig(w_bits=4, a_bits=None, observer="percentile", percentile=99.9)
    assert PTQConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown PTQConfig field"):
        PTQConfig.from_dict({"wbits": 4})
    for bad in (1, 17, 0, 3.5, "8", True):
        with pytest.raises(ConfigError):
            PTQConfig(w_bits=bad)
    with pytest.raises(ConfigError, match="out of range"):
        PTQConfig(a_bits=1)
    with pytest.raises(ConfigError):
        PTQConfig(softmax_quantizer="cubic")


def test_configs_from_bits() -> None:
    labels = [c.label for c in configs_from_bits("8,6,4,3")]
    assert labels == ["W8A8", "W6A6", "W4A4", "W3A3"]
    labels = [c.label for c in configs_from_bits(None, wbits="4,8", abits="8,32")]
    assert labels == ["W4A8", "W4A32", "W8A8", "W8A32"]
    assert [c.label for c in configs_from_bits(["W4A8", "W8A32"])] == ["W4A8", "W8A32"]
    assert configs_from_bits("4", observer="mse")[0].observer == "mse"
    for bad in ("9x", "1", "4,40a"):
        with pytest.raises(ConfigError):
            configs_from_bits(bad)
    with pytest.raises(ConfigError, match="nothing to sweep"):
        configs_from_bits("")


def test_empty_calibration_set_is_a_clear_error() -> None:
    for calib in (None, [], [torch.zeros(0, 1, 16, 16)]):
        with pytest.raises(DataError, match="calibration set is empty"):
            quantize_model(tiny_cnn(), PTQConfig(), calib)


def _labelled(model: nn.Module, n: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = images(n)
    with torch.no_grad():
        y = model(x).argmax(1)  # FP model is 100 % right by construction
    return [(x[:64], y[:64]), (x[64:], y[64:])]


def test_sweep_and_wqe_vs_aqe_rows() -> None:
    model = tiny_cnn()
    data = _labelled(model)
    rows = sweep([("cnn", model)], configs_from_bits("8,2"), data, data, progress=False)
    assert [r["config"] for r in rows] == ["FP32", "W8A8", "W2A2"]
    assert rows[0]["accuracy"] == 100.0 and rows[1]["accuracy"] >= 90.0
    assert {"checkpoint", "method", "w_bits", "a_bits", "observer", "accuracy", "loss", "calib_time_s",
            "eval_time_s"} <= rows[1].keys()
    table = wqe_vs_aqe(model, data, data, bits=(8, 3), progress=False)
    assert [r["quantized"] for r in table] == ["none", "weights", "activations", "both"] * 1 + [
        "weights", "activations", "both"]
    assert table[0]["d_accuracy"] == 0.0 and all("d_loss" in r for r in table)


def test_drops_are_measured_against_the_fp_row_of_the_same_model() -> None:
    from workbench.ptq import against_fp

    def row(name: str, config: str, acc: float, loss: float) -> dict:
        return {"checkpoint": name, "config": config, "accuracy": acc, "loss": loss}

    rows = [row("a", "FP32", 90.0, 0.3), row("b", "FP32", 80.0, 0.5), row("b", "W4A4", 71.5, 0.9),
            row("a", "W4A4", 88.0, 0.4)]
    assert against_fp(rows) is rows
    assert [(r["drop"], r["loss_increase"]) for r in rows] == [(0.0, 0.0), (0.0, 0.0), (8.5, pytest.approx(0.4)),
                                                                (2.0, pytest.approx(0.1))]
    with pytest.raises(ConfigError, match=r"no FP32 row for \['c'\].*include_fp=True"):
        against_fp([row("a", "FP32", 90.0, 0.3), row("c", "W4A4", 50.0, 1.0)])


def test_not_a_checkpoint_is_a_clear_error(tmp_path) -> None:
    from workbench.ptq import sweep_checkpoints

    bogus = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for path in (bogus, text, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError):
            sweep_checkpoints([path], configs_from_bits("8"), progress=False)


def test_checkpoint_sweep_and_cli_hook(ptq_cli) -> None:
    rows = ptq_cli("--bits", "8", "--n-calib", "32", "--n-eval", "256")
    assert [r["config"] for r in rows] == ["FP32", "W8A8"]
    assert rows[0]["checkpoint"] == str(ptq_cli.path) and rows[0]["method"] == "plain"


# ---------------------------------------------------------------------------------------
# real integer path


@pytest.mark.parametrize("make", [tiny_cnn, tiny_vit])
def test_onnx_integer_runtime_matches_fake_quant(make, tmp_path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from workbench.ptq.onnx_export import cross_check

    model = make()
    data = _labelled(model, 256)
    qm = quantize_model(model, PTQConfig(), data)
    res = cross_check(model, qm, data, tmp_path / "m.onnx")
    assert res["ops"].get("MatMulInteger", 0) + res["ops"].get("ConvInteger", 0) >= 3
    # The integer kernels are exact (next test); what is left is float32 ordering around them,
    # measured at 3e-8 in the logits and no changed prediction. The bounds leave room for one
    # activation code flipping at a rounding boundary on another CPU, not for a wrong kernel
    # (uint8 x int8 saturation on AVX2 gave 0.06 and 3 of 256 predictions).
    assert abs(res["accuracy_gap"]) <= 0.4  # at most one of 256 predictions differs
    assert res["logit_max_abs_diff"] < 1e-3


def test_onnx_integer_kernel_is_exact_at_full_range_codes(tmp_path) -> None:
    # Full-range codes (uint8 activations up to 255, weights +-127) are where a uint8 x int8
    # kernel that sums pairs in int16 saturates; the exported layer must equal an int64 matmul.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from workbench.ptq.onnx_export import export_onnx, onnx_session

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 16)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.sign(torch.randn(16, 256)) * (0.5 + 0.5 * torch.rand(16, 256)))
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # all >= 0: zero point 0
    qm = quantize_model(model, PTQConfig(w_bits=8, a_bits=8), [(x, torch.zeros(64, dtype=torch.long))])
    layer = next(m for m in qm.modules() if isinstance(m, QuantLinear))
    export_onnx(qm, tmp_path / "m.onnx", x[:2])
    got = torch.from_numpy(onnx_session(tmp_path / "m.onnx").run(["logits"], {"images": x.numpy()})[0])
    # independent reference: the same codes multiplied in int64
    aq = layer.input_quant
    s_x, zp = aq.scale.detach().double(), int(aq.zero_point.item())
    x_codes = torch.clamp(torch.round(x.flatten(1).double() / s_x) + zp, 0, 255).long()
    w_codes = layer.weight_codes().long()
    assert int(x_codes.max()) == 255 and int(w_codes.abs().max()) == 127
    acc = (x_codes - zp) @ w_codes.t()
    ref = acc.double() * (s_x * layer.w_step.double().reshape(-1)) + model[1].bias.detach().double()
    # one float32 rounding of the scale product and one of the bias add, nothing more
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_onnx_export_refuses_what_has_no_integer_form(tmp_path) -> None:
    pytest.importorskip("onnx")
    from workbench.ptq.onnx_export import export_onnx

    x = images(8)
    for cfg in (PTQConfig(w_bits=8, a_bits=None), PTQConfig(w_bits=16, a_bits=8),
                PTQConfig(softmax_quantizer="log2"), PTQConfig(a_symmetric=True)):
        qm = quantize_model(tiny_vit(), cfg, [x])
        with pytest.raises(ConfigError):
            export_onnx(qm, tmp_path / "m.onnx", x)


def test_fused_qkv_path_equals_separate_quantizers(monkeypatch) -> None:
    model = tiny_vit()
    x = images(16)
    qm = quantize_model(model, PTQConfig(w_bits=4, a_bits=4), [x])
    with torch.no_grad():
        fused = qm(x)
        monkeypatch.setattr(QuantAttention, "_fused_qkv_params", lambda self: None)
        separate = qm(x)
    assert torch.equal(fused, separate)


def test_folded_input_scale_equals_fake_quant_then_matmul(monkeypatch) -> None:
    from workbench.ptq.modules import QuantConv, QuantLayer, QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(16, 1, 8, 8)
    qm = quantize_model(model, PTQConfig(w_bits=4, a_bits=4), [x])
    layers = [m for m in qm.modules() if isinstance(m, (QuantConv, QuantLinear))]
    with torch.no_grad():
        folded = qm(x)
        assert all(m._folded() is not None for m in layers)
        layers[-1].weight_q.mul_(2)  # an in-place change must not be served from the stale cache
        folded2 = qm(x)
        monkeypatch.setattr(QuantLayer, "_folded", lambda self: None)
        plain2 = qm(x)
        layers[-1].weight_q.div_(2)
        plain = qm(x)
    assert torch.allclose(folded, plain, rtol=1e-5, atol=1e-6)
    assert torch.allclose(folded2, plain2, rtol=1e-5, atol=1e-6) and not torch.allclose(folded2, folded)


def test_hooked_quantizers_are_called_not_bypassed() -> None:
    model = tiny_vit()
    x = images(8)
    qm = quantize_model(model, PTQConfig(w_bits=4, a_bits=4), [x])
    seen: list[str] = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(mod.label))
               for m in qm.modules() if isinstance(m, ActQuantizer) and m.mode == "quant"]
    with torch.no_grad():
        hooked = qm(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        fast = qm(x)
    n_quantizers = sum(isinstance(m, ActQuantizer) and m.mode == "quant" for m in qm.modules())
    assert len(seen) == n_quantizers and {"q", "k", "v", "softmax", "input"} <= set(seen)
    assert torch.allclose(hooked, fast, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# bias correction


def test_bias_correction_of_one_layer_is_the_closed_form_shift() -> None:
    """Weights only: the quantized layer's mean output on the calibration set moves by
    ``(W_q - W) mean(x)``; bias correction adds exactly the opposite to the bias."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 5))
    x = torch.randn(64, 12, generator=g) + 0.7  # a non-zero mean input: the shift is visible
    cfg = PTQConfig(w_bits=3, a_bits=None)
    plain = quantize_model(model, cfg)
    corrected = quantize_model(model, cfg.replace(bias_correction=True), [x])
    w, wq = model[0].weight.double(), plain.model[0].weight_q.double()
    want = model[0].bias.double() - (wq - w) @ x.double().mean(0)
    torch.testing.assert_close(corrected.model[0].layer.bias.double(), want, rtol=0, atol=1e-6)
    assert torch.equal(plain.model[0].layer.bias, model[0].bias)  # off by default
    assert cfg.replace(bias_correction=True).method == "rtn+bc" and cfg.method == "rtn"


def test_bias_correction_matches_every_layers_mean_output_in_order() -> None:
    """Weights and activations quantized, bias-free layers included: after correction each
    layer's mean output per channel on the calibration images equals the full-precision one,
    with every earlier layer's correction in place (the layers are done in order)."""
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                          nn.GELU(), nn.Linear(8, 3, bias=False)).eval()
    x = torch.randn(48, 2, 8, 8, generator=g)
    batches = ((x[i:i + 16], torch.zeros(16)) for i in range(0, 48, 16))  # an iterator: read twice
    qm = quantize_model(model, PTQConfig(w_bits=3, a_bits=4, bias_correction=True, n_calib=48), batches)
    names = ["0", "3", "5"]
    got, want = {}, {}
    hooks = [qm.model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o))
             for n in names]
    hooks += [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: want.__setitem__(n, o))
              for n in names]
    with torch.no_grad():
        qm(x)
        model(x)
    for h in hooks:
        h.remove()
    for n in names:
        dims = (0, 2, 3) if got[n].dim() == 4 else (0,)
        torch.testing.assert_close(got[n].double().mean(dims), want[n].double().mean(dims), rtol=0, atol=1e-5)
    # without the correction the means differ (so the check above can fail)
    raw = quantize_model(model, PTQConfig(w_bits=3, a_bits=4, n_calib=48), [x])
    with torch.no_grad():
        out = raw(x)
    assert (out.double().mean(0) - model(x).double().mean(0)).abs().max() > 1e-3
    assert qm.model.get_submodule("0").layer.bias is not None and model[0].bias is None  # original untouched
