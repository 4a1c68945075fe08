"""Noise pre-conditioner: statistics, reversibility, gradients, determinism, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from workbench import quant
from workbench.errors import ConfigError, ModelError
from workbench.noise import NoiseConfig, attach, schedule_scale, select_layers


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                             depth=2, num_heads=2)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def train_step(model: nn.Module, handle, x, y, lr: float = 0.1) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if handle is not None:
        handle.restore()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("bank", [True, False])
@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_weight_noise_std_per_channel(bank: bool, distribution: str) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(20000, 16, bias=False)
    with torch.no_grad():  # channels of very different scales
        lin.weight.mul_(torch.logspace(-2, 1, 16).unsqueeze(1))
    clean = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    h = attach(model, NoiseConfig(w_bits=4, a_bits=None, noise_mult_w=1.5, bank=bank,
                                  distribution=distribution))
    model(torch.randn(2, 20000))  # training forward: weights now noisy until backward
    noise = lin.weight.detach() - clean
    h.remove()
    assert torch.equal(lin.weight, clean)
    expected = 1.5 * quant.weight_qparams(clean, 4).step.squeeze(1) / math.sqrt(12)
    ratio = noise.std(dim=1) / expected
    assert torch.all((ratio - 1).abs() < 0.03), ratio
    assert torch.all(noise.mean(dim=1).abs() < 5 * expected / math.sqrt(noise.shape[1]))  # zero mean
    if distribution == "uniform":  # bounded by sqrt(3) sigma
        assert torch.all(noise.abs().amax(dim=1) <= expected * math.sqrt(3) * 1.0001)


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_activation_noise_std_per_tensor(distribution: str) -> None:
    torch.manual_seed(2)
    lin = nn.Linear(64, 4)
    model = nn.Sequential(lin)
    seen = {}
    lin.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].detach().clone()))
    x = torch.rand(4096, 64) * 3 - 0.5  # asymmetric range [-0.5, 2.5]
    with attach(model, NoiseConfig(w_bits=None, a_bits=6, noise_mult_a=2.0, distribution=distribution)):
        model(x)
    noise = seen["x"] - x
    expected = 2.0 * quant.activation_qparams(x.min(), x.max(), 6).step / math.sqrt(12)
    assert abs(noise.std() / expected - 1) < 0.03
    assert torch.equal(lin.weight, model[0].weight)  # no weight noise configured


def test_eval_outputs_bitwise_equal_and_removal_restores() -> None:
    model = tiny_vit()
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    model.eval()
    ref = model(x)
    h = attach(model, NoiseConfig(w_bits=4, a_bits=4, noise_mult_w=3.0, noise_mult_a=3.0))
    assert torch.equal(model(x), ref)
    model.train()
    train_step(model, h, x, y, lr=0.0)  # lr 0: the clean weights must come back bit-exactly
    model(x)  # a training forward without backward leaves noise behind ...
    model.eval()
    assert torch.equal(model(x), ref)  # ... which an eval forward clears first
    h.remove()
    assert torch.equal(model(x), ref)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = model(x)
    assert torch.equal(a, b)  # no hooks left in training mode either


def test_state_dict_keys_and_values_clean() -> None:
    for model in (tiny_vit(), small_cnn()):
        plain = copy.deepcopy(model)
        keys = list(model.state_dict())
        h = attach(model, NoiseConfig(w_bits=4, a_bits=8))
        assert list(model.state_dict()) == keys
        model.train()
        x = torch.randn(4, 1, 28, 28)
        model(x)  # weights noisy now; saving must still see the clean model
        sd = model.state_dict()
        for k, v in plain.state_dict().items():
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(sd[k], v), k
        h.remove()
        assert list(model.state_dict()) == keys


def test_gradients_reach_clean_weights_manual() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(32, 8)
    model = nn.Sequential(lin)
    clean_w = lin.weight.detach().clone()
    captured = {}

    def grab(m, args, out):
        captured["x"] = args[0].detach().clone()
        captured["w"] = m.weight.detach().clone()

    lin.register_forward_hook(grab)
    x = torch.randn(16, 32)
    c = torch.randn(16, 8)
    h = attach(model, NoiseConfig(w_bits=3, a_bits=3, noise_mult_w=2.0, noise_mult_a=2.0))
    (model(x) * c).sum().backward()
    assert torch.equal(lin.weight, clean_w)  # restored as soon as the gradient was complete
    assert not torch.equal(captured["w"], clean_w)
    # manual gradient at the noisy point: d/dW sum(c * (x_n W_n^T + b)) = c^T x_n
    assert torch.allclose(lin.weight.grad, c.t() @ captured["x"], atol=1e-5)
    wn = captured["w"].clone().requires_grad_()
    (nn.functional.linear(captured["x"], wn, lin.bias.detach()) * c).sum().backward()
    assert torch.allclose(lin.weight.grad, wn.grad, atol=1e-6)
    assert torch.allclose(lin.bias.grad, c.sum(0), atol=1e-5)
    h.remove()


def test_same_seed_same_result() -> None:
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    results = []
    for seed in (0, 0, 1):
        model = small_cnn()
        h = attach(model, NoiseConfig(w_bits=4, a_bits=4, seed=seed, a_stats_every=1))
        torch.manual_seed(0)
        for _ in range(3):
            train_step(model, h, x, y)
        h.remove()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize("bank", [True, False])
def test_state_dict_continues_the_exact_noise_stream(bank: bool, tmp_path) -> None:
    # cached weight steps (w_stats_every), range EMAs, the bank, its offsets and generator:
    # a handle loaded from the state (through a weights_only file) continues bit for bit
    cfg = NoiseConfig(w_bits=4, a_bits=4, seed=3, a_stats_every=2, w_stats_every=3, bank=bank,
                      bank_refresh=0.25)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 1, 28, 28, generator=g) for _ in range(9)]
    ys = [torch.randint(0, 10, (8,), generator=g) for _ in range(9)]
    model = small_cnn()
    h = attach(model, cfg)
    for x, y in zip(xs[:4], ys[:4]):
        train_step(model, h, x, y)
    torch.save({"noise": h.state_dict(), "weights": model.state_dict()}, tmp_path / "s.pt")
    for x, y in zip(xs[4:], ys[4:]):
        train_step(model, h, x, y)
    h.remove()
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    other = small_cnn()
    other.load_state_dict(saved["weights"])
    h2 = attach(other, NoiseConfig(**{**cfg.to_dict(), "seed": 99}))  # the saved stream wins over the seed
    h2.load_state_dict(saved["noise"])
    for x, y in zip(xs[4:], ys[4:]):
        train_step(other, h2, x, y)
    h2.remove()
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_activation_range_is_an_ema() -> None:
    lin = nn.Linear(4, 2)
    model = nn.Sequential(lin)
    h = attach(model, NoiseConfig(w_bits=None, a_bits=8, ema_momentum=0.5, a_stats_every=1))
    model(torch.tensor([[-1.0, 1.0, 0.0, 0.5]]))
    model(torch.tensor([[-3.0, 2.0, 0.0, 0.5]]))
    s = h.state_dict()["act"][0]
    assert s["xmin"].item() == pytest.approx(-2.0) and s["xmax"].item() == pytest.approx(1.5)
    expected = quant.activation_qparams(-2.0, 1.5, 8).noise_std
    assert h.noise_std()["0"]["a"].item() == pytest.approx(expected.item())
    h.remove()


def test_scale_and_schedule() -> None:
    cfg = NoiseConfig(schedule="ramp", ramp_epochs=2)
    assert schedule_scale(cfg, 0, 10) == pytest.approx(0.05)
    assert schedule_scale(cfg, 19, 10) == 1.0 and schedule_scale(cfg, 500, 10) == 1.0
    assert schedule_scale(NoiseConfig(), 0, 10) == 1.0
    model = small_cnn().train()
    model[1].eval()  # BatchNorm in eval so that only the noise could change the output
    x = torch.randn(4, 1, 28, 28)
    ref = model(x)
    h = attach(model, NoiseConfig(w_bits=4, a_bits=4))
    assert not torch.equal(model(x), ref)
    h.set_scale(0.0)
    assert torch.equal(model(x), ref)
    with pytest.raises(ConfigError):
        h.set_scale(-1)
    h.remove()


def test_include_exclude() -> None:
    model = tiny_vit()
    names = [n for n, _ in select_layers(model, exclude=("head", "patch_embed.*"))]
    assert "head" not in names and "patch_embed.proj" not in names and "blocks.0.attn.qkv" in names
    assert [n for n, _ in select_layers(model, include=("blocks.1.mlp.*",))] == ["blocks.1.mlp.fc1",
                                                                                   "blocks.1.mlp.fc2"]


def test_config_roundtrip() -> None:
    cfg = NoiseConfig(w_bits=3, a_bits=None, exclude=["head"], schedule="ramp", ramp_epochs=3)
    assert NoiseConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        NoiseConfig.from_dict({"w_bit": 4})


@pytest.mark.parametrize("kwargs", [
    {"w_bits": 1}, {"w_bits": 17}, {"a_bits": 33}, {"w_bits": 4.5}, {"noise_mult_w": -0.1},
    {"noise_mult_a": float("nan")}, {"distribution": "laplace"}, {"schedule": "cosine"},
    {"ema_momentum": 1.0}, {"a_stats_every": 0}, {"bank_refresh": 0.0},
])
def test_bad_config(kwargs) -> None:
    with pytest.raises(ConfigError):
        NoiseConfig(**kwargs)


def test_bad_models() -> None:
    with pytest.raises(ModelError, match="no Linear/Conv"):
        attach(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ModelError, match="select none"):
        attach(small_cnn(), include=("nothing*",))
    with pytest.raises(ModelError):
        attach("not a model")  # type: ignore[arg-type]
