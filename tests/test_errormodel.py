"""Error model: measured WQE/AQE against Delta/sqrt(12), shape statistics, KS, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workbench import quant
from workbench.errormodel import (
    COLUMNS,
    error_samples,
    gaussian_cdf,
    ks_distance,
    measure,
    shape_stats,
    uniform_cdf,
)
from workbench.errors import ConfigError, ModelError


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                             depth=2, num_heads=2)


def calib(n: int = 3) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(n)]


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_wqe_of_gaussian_weights_matches_model(bits: int) -> None:
    torch.manual_seed(bits)
    lin = nn.Linear(1024, 64)
    with torch.no_grad():  # trained-like: Gaussian rows with different scales
        lin.weight.copy_(torch.randn(64, 1024) * torch.logspace(-2, 0, 64).unsqueeze(1))
    rows = measure(nn.Sequential(lin), [], bits, None)
    (row,) = rows
    assert row["kind"] == "wqe" and row["numel"] == 64 * 1024 and row["channels"] == 64
    assert abs(row["ratio"] - 1) < 0.05, row
    assert 0.9 < row["channel_ratio_min"] <= row["channel_ratio_max"] < 1.1
    assert row["max_err_over_step"] <= 0.5 + 1e-6
    # independent reference: quantize by hand with the textbook per-channel formula
    w = lin.weight.detach()
    step = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    err = torch.clamp(torch.round(w / step), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) * step - w
    assert row["std"] == pytest.approx(float(err.std(unbiased=False)), rel=1e-5)
    assert row["pred_std"] == pytest.approx(float((step / math.sqrt(12)).square().mean().sqrt()), rel=1e-5)
    assert row["ks_uniform"] < row["ks_gaussian"]  # rounding error looks uniform at these bits
    assert row["kurtosis"] == pytest.approx(-1.2, abs=0.15)


def test_wqe_reports_outlier_channel_and_low_bits() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 512)
    w[3, 0] = 60.0  # one outlier weight: channel 3's step is huge, its error is not uniform
    lin = nn.Linear(512, 8)
    with torch.no_grad():
        lin.weight.copy_(w)
    (row,) = measure(nn.Sequential(lin), [], 4, None)
    assert row["step_spread"] > 5
    assert row["channel_ratio_min"] < 0.8  # most weights of channel 3 round to 0


def test_aqe_rows_and_ratio() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    data = [torch.rand(256, 64) * 4 - 1 for _ in range(3)]
    rows = measure(model, data, 8, 8, max_batches=2)
    assert all(set(r) == set(COLUMNS) for r in rows)
    kinds = {(r["layer"], r["kind"]) for r in rows}
    assert kinds == {("0", "wqe"), ("2", "wqe"), ("0", "aqe"), ("2", "aqe")}
    first = next(r for r in rows if r["layer"] == "0" and r["kind"] == "aqe")
    assert first["numel"] == 2 * 256 * 64  # max_batches respected
    lo = min(float(d.min()) for d in data[:2])
    hi = max(float(d.max()) for d in data[:2])
    assert first["step"] == pytest.approx(float(quant.activation_qparams(lo, hi, 8).step), rel=1e-6)
    assert abs(first["ratio"] - 1) < 0.03
    assert first["max_err_over_step"] <= 0.5 + 1e-6


def test_vit_with_attention_sites() -> None:
    model = tiny_vit()
    model.train()
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attn) == 2
    # one module fused (as timm picks on machines with the fused kernel), one not: each gets its own back
    attn[0].fused_attn, attn[1].fused_attn = True, False
    during: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: during.append(mod.fused_attn)) for m in attn]
    try:
        rows = measure(model, calib(), 6, 6, include_attention=True, max_samples=5000)
    finally:
        for h in hooks:
            h.remove()
    # the softmax output is only observable on the unfused path (through attn_drop): it ran unfused
    assert during and not any(during)
    sites = {r["site"] for r in rows}
    assert {"weight", "input", "q", "k", "v", "attn"} <= sites
    names = {r["layer"] for r in rows}
    assert {"blocks.0.attn.q", "blocks.1.attn.attn", "blocks.0.attn.qkv", "head"} <= names
    assert model.training  # mode restored
    assert [m.fused_attn for m in attn] == [True, False]  # each module's setting restored
    attn_row = next(r for r in rows if r["layer"] == "blocks.0.attn.attn")
    assert attn_row["numel"] == 3 * 16 * 2 * 17 * 17  # batches x B x heads x tokens x tokens
    no_attn = measure(model, calib(), None, 6)
    assert not any(r["site"] in ("q", "k", "v", "attn") for r in no_attn)


def test_error_samples() -> None:
    model = tiny_vit()
    e = error_samples(model, None, "blocks.0.mlp.fc1", "wqe", 4, n=500)
    assert e.shape == (500,)
    u = error_samples(model, None, "blocks.0.mlp.fc1", "wqe", 4, n=500, normalized=True)
    assert u.abs().max() <= 0.5 + 1e-6
    a = error_samples(model, calib(), "blocks.0.attn.qkv", "aqe", 4, n=300)
    assert a.shape == (300,)
    s = error_samples(model, calib(), "blocks.1.attn.attn", "aqe", 4, n=300, normalized=True)
    assert s.shape == (300,) and s.abs().max() <= 0.5 + 1e-6
    with pytest.raises(ModelError):
        error_samples(model, calib(), "blocks.9.mlp.fc1", "aqe", 4)
    with pytest.raises(ConfigError):
        error_samples(model, calib(), "head", "xqe", 4)


def test_ks_and_shape_stats_against_references() -> None:
    # a single point at 0.5 against U(0, 1): sup distance 0.5
    assert ks_distance(torch.tensor([0.5]), lambda x: x.clamp(0, 1)) == pytest.approx(0.5)
    # two points: ECDF jumps at 0.25 and 0.75, CDF x: max distance 0.25
    assert ks_distance(torch.tensor([0.75, 0.25]), lambda x: x.clamp(0, 1)) == pytest.approx(0.25)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(100_000, generator=g)
    s = shape_stats(z)
    assert abs(s["kurtosis"]) < 0.1 and s["ks_gaussian"] < 0.01 and s["ks_uniform"] > 0.05
    u = torch.rand(100_000, generator=g)
    s = shape_stats(u)
    assert s["kurtosis"] == pytest.approx(-1.2, abs=0.05) and s["ks_uniform"] < 0.01 < s["ks_gaussian"]
    assert float(gaussian_cdf(0.0, 1.0)(torch.tensor([1.0], dtype=torch.float64))) == pytest.approx(0.8413447, abs=1e-6)
    assert float(uniform_cdf(0.0, 1.0)(torch.tensor([0.0], dtype=torch.float64))) == pytest.approx(0.5)


def test_bad_input() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ConfigError):
        measure(model, [], 1, None)
    with pytest.raises(ConfigError):
        measure(model, [], 4, 17)
    with pytest.raises(ConfigError):
        measure(model, [], None, None)
    with pytest.raises(ConfigError, match="no calibration"):
        measure(model, [], None, 8)
    with pytest.raises(ModelError, match="no Linear/Conv"):
        measure(nn.Sequential(nn.ReLU()), [], 4, None)
    with pytest.raises(ModelError, match="Attention"):
        measure(model, [torch.randn(2, 4)], None, 8, include_attention=True)
