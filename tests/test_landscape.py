"""Loss landscapes: origin equals the model's loss, filter normalization, 1-D parameters, no side effects."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench import landscape as ls
from workbench.errors import ConfigError, ModelError


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        nn.init.zeros_(self.conv.bias)  # fresh models: all-zero 1-D parameters
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = _Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(seed)
    return model, (torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g))


def _eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = float(F.cross_entropy(model(x), y))
    model.train(was)
    return out


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_origin_equals_model_loss_and_model_untouched():
    model, (x, y) = _setup()
    model.train()
    before = _snapshot(model)
    want = _eval_loss(model, x, y)
    r1 = ls.landscape_1d(model, (x, y), span=(-1, 1), steps=5, generator=torch.Generator().manual_seed(0),
                         progress=False)
    assert r1.alphas[2] == 0.0 and r1.losses[2] == pytest.approx(want, abs=1e-6)
    r2 = ls.landscape_2d(model, (x, y), span=(-0.5, 0.5), steps=(3, 5), progress=False)
    assert len(r2.losses) == 3 and len(r2.losses[0]) == 5
    assert r2.losses[1][2] == pytest.approx(want, abs=1e-6)
    assert len(r2.rows()) == 15 and set(r2.rows()[0]) == {"alpha", "beta", "loss", "accuracy"}
    assert _unchanged(model, before) and model.training and model.bn.training
    # several batches: the sample-weighted mean, same as one big batch
    r3 = ls.landscape_1d(model, [(x[:5], y[:5]), (x[5:], y[5:])], steps=1, span=(0, 0), progress=False)
    assert r3.losses[0] == pytest.approx(want, abs=1e-6)


def test_filter_normalization_and_one_d_params():
    model, _ = _setup()
    with torch.no_grad():
        model.conv.weight[1].zero_()  # a dead filter
    for one_d in ("ignore", "normalize", "random"):
        d = ls.random_direction(model, one_d=one_d, generator=torch.Generator().manual_seed(0))
        assert all(torch.isfinite(v).all() for v in d.values())
        w = model.conv.weight.detach()
        torch.testing.assert_close(d["conv.weight"].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
        assert torch.equal(d["conv.weight"][1], torch.zeros_like(w[1]))
        if one_d == "ignore":
            assert not d["bn.weight"].any() and not d["fc.bias"].any()
        if one_d == "normalize":
            assert float(d["bn.weight"].norm()) == pytest.approx(float(model.bn.weight.detach().norm()), rel=1e-5)
            assert not d["fc.bias"].any()  # all-zero bias: zero direction, not 0/0
        if one_d == "random":
            assert d["fc.bias"].any()
    with pytest.raises(ConfigError):
        ls.random_direction(model, one_d="bogus")


def test_fresh_timm_model_has_no_nan():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=3, in_chans=1)  # zero biases, BN at init
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4,))
    for one_d in ("ignore", "normalize"):
        d = ls.random_direction(model, one_d=one_d, generator=torch.Generator().manual_seed(0))
        assert all(torch.isfinite(v).all() for v in d.values())
        r = ls.landscape_1d(model, (x, y), direction=d, steps=3, span=(-0.5, 0.5), progress=False)
        assert all(math.isfinite(v) for v in r.losses)


def test_line_between_two_models():
    a, (x, y) = _setup(0)
    b, _ = _setup(1)
    before_a, before_b = _snapshot(a), _snapshot(b)
    r = ls.landscape_line(a, b, (x, y), span=(-0.5, 1.5), steps=9, progress=False)
    assert r.kind == "line" and r.alphas[2] == 0.0 and r.alphas[6] == 1.0
    assert r.losses[2] == pytest.approx(_eval_loss(a, x, y), abs=1e-6)
    assert r.losses[6] == pytest.approx(_eval_loss(b, x, y), abs=1e-6)
    assert all(math.isfinite(v) for v in r.losses)  # extrapolation keeps BN variances valid
    r_sd = ls.landscape_line(a, b.state_dict(), (x, y), span=(-0.5, 1.5), steps=9, progress=False)
    assert r_sd.losses == r.losses
    assert _unchanged(a, before_a) and _unchanged(b, before_b)
    rows = r.rows()
    assert len(rows) == 9 and rows[0]["kind"] == "line"


def test_bad_inputs():
    model, (x, y) = _setup()
    with pytest.raises(ConfigError):
        ls.landscape_1d(model, (x[:0], y[:0]), progress=False)
    with pytest.raises(ConfigError):
        ls.landscape_1d(model, (x, y), steps=0, progress=False)
    with pytest.raises(ConfigError):
        ls.landscape_2d(model, (x, y), span=(1, -1), progress=False)
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ModelError):
        ls.landscape_line(model, other, (x, y), progress=False)
    with pytest.raises(ModelError):
        ls.landscape_1d(model, (x, y), direction={"fc.weight": torch.zeros(2, 2)}, progress=False)
