"""Quantizer primitives against hand-written references: steps, bound, idempotence, clamping."""

from __future__ import annotations

import math

import pytest
import torch

from workbench import quant
from workbench.errors import ConfigError


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_step_formulas(bits: int) -> None:
    w = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.3]])
    qp = quant.weight_qparams(w, bits)
    expected = torch.tensor([[2.0], [0.3]]) / (2 ** (bits - 1) - 1)
    assert torch.allclose(qp.step, expected) and qp.symmetric
    assert (qp.qmin, qp.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert torch.allclose(quant.weight_qparams(w, bits, per_channel=False).step,
                          torch.tensor(2.0 / (2 ** (bits - 1) - 1)))
    a = quant.activation_qparams(-1.0, 3.0, bits)
    assert float(a.step) == pytest.approx(4.0 / (2**bits - 1))
    assert (a.qmin, a.qmax) == (0, 2**bits - 1)
    # the range is widened to contain 0, and zero is exactly representable
    pos = quant.activation_qparams(1.0, 3.0, bits)
    assert float(pos.step) == pytest.approx(3.0 / (2**bits - 1))
    assert float(quant.fake_quantize(torch.tensor(0.0), a)) == 0.0
    assert float(a.noise_std) == pytest.approx(float(a.step) / math.sqrt(12))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_bound_and_idempotence(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 300, generator=g)
    qp = quant.weight_qparams(w, bits)
    q = quant.fake_quantize(w, qp)
    assert torch.all((q - w).abs() <= qp.step / 2 * (1 + 1e-6))
    assert torch.equal(quant.fake_quantize(q, qp), q)  # idempotent
    codes = quant.quantize(w, qp)
    assert torch.equal(codes, codes.round()) and codes.min() >= qp.qmin and codes.max() <= qp.qmax
    assert torch.equal(quant.quantization_error(w, qp), q - w)
    x = torch.rand(5000, generator=g) * 5 - 2
    ap = quant.activation_qparams(x.min(), x.max(), bits)
    qx = quant.fake_quantize(x, ap)
    assert torch.all((qx - x).abs() <= ap.step / 2 * (1 + 1e-5))
    assert torch.allclose(quant.fake_quantize(qx, ap), qx, atol=1e-6)


def test_clamping_outside_range() -> None:
    qp = quant.activation_qparams(-1.0, 1.0, 4)
    out = quant.fake_quantize(torch.tensor([-10.0, 10.0]), qp)
    assert torch.allclose(out, torch.stack([qp.lower(), qp.upper()]).flatten())
    wq = quant.weight_qparams(torch.ones(1, 4), 3, absmax=torch.tensor([[0.5]]))  # observer clip
    assert torch.allclose(quant.fake_quantize(torch.ones(1, 4) * 2, wq), torch.full((1, 4), 0.5))


def test_all_zero_channel_does_not_divide_by_zero() -> None:
    w = torch.zeros(2, 3)
    qp = quant.weight_qparams(w, 4)
    assert torch.all(qp.step > 0)
    assert torch.equal(quant.fake_quantize(w, qp), w)


@pytest.mark.parametrize("bad", [1, 0, 17, 32, 4.5, "8", None, True])
def test_bits_refused(bad) -> None:
    with pytest.raises(ConfigError):
        quant.check_bits(bad)
    with pytest.raises(ConfigError):
        quant.weight_qparams(torch.ones(2, 2), bad)


def test_parse_bits_pair() -> None:
    assert quant.parse_bits_pair("W4A8") == (4, 8)
    assert quant.parse_bits_pair("4,8") == (4, 8)
    assert quant.parse_bits_pair("6") == (6, 6)
    assert quant.parse_bits_pair("W8A32") == (8, None)
    with pytest.raises(ConfigError):
        quant.parse_bits_pair("W1A8")
    with pytest.raises(ConfigError):
        quant.parse_bits_pair("four")
