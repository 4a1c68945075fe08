"""Pre-conditioning methods: lifecycle, SAM's closed form, SWA's average, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from workbench.errors import ConfigError, ModelError, UnknownNameError, WorkbenchWarning
from workbench.precondition import (
    MethodConfig,
    SAMMethod,
    create_method,
    list_methods,
    sam_perturbation,
)
from workbench.train_method import StepContext, TrainMethod

#: Methods whose trained model is a plain full-precision model again (hooks detached).
FP_METHODS = ["plain", "wnoise", "anoise", "dnq", "uniform", "sam", "swa"]
#: qat keeps its learned quantizers in the trained model by design: tests/test_qat.py covers it.
ALL = [*FP_METHODS, "qat"]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 10))


def make_ctx(model: nn.Module, epochs: int = 2, steps: int = 3, lr: float = 0.05,
             batches: list | None = None) -> StepContext:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return StepContext(loss_fn=nn.functional.cross_entropy, optimizer=opt, device=torch.device("cpu"),
                       epochs=epochs, steps_per_epoch=steps,
                       train_batches=(lambda: iter(batches)) if batches is not None else None)


def run(method: TrainMethod, model: nn.Module, ctx: StepContext, data: list) -> list[float]:
    """The lifecycle of workbench.train.fit, in miniature."""
    losses = []
    model.train()
    method.setup(model, ctx)
    try:
        for epoch in range(ctx.epochs):
            method.on_epoch_start(model, epoch)
            for x, y in data:
                losses.append(float(method.training_step(model, x, y, ctx)))
            method.on_epoch_end(model, epoch)
        method.finalize(model, ctx)
    finally:
        method.teardown(model)
    return losses


def fake_data(n: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_registry_lists_all_methods() -> None:
    assert sorted(ALL) == list_methods()


@pytest.mark.parametrize("name", FP_METHODS)
def test_every_method_trains_and_detaches(name: str) -> None:
    model = small_cnn()
    keys = list(model.state_dict())
    data = fake_data()
    method = create_method(MethodConfig(method=name, w_bits=4, a_bits=8, seed=0))
    assert method.describe()["method"] == name
    before = [p.detach().clone() for p in model.parameters()]
    losses = run(method, model, make_ctx(model, batches=data), data)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it learned
    assert list(model.state_dict()) == keys
    # teardown left the plain forward: eval output equals a deep copy's (no hooks on the copy)
    model.eval()
    x = data[0][0]
    ref = copy.deepcopy(model)
    for m in ref.modules():
        m._forward_pre_hooks.clear()
    assert torch.equal(model(x), ref(x))
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())


def test_noise_method_same_seed_same_result() -> None:
    out = []
    for seed in (0, 0, 1):
        model = small_cnn()
        data = fake_data()
        run(create_method(MethodConfig(method="dnq", w_bits=3, a_bits=4, seed=seed)), model,
            make_ctx(model), data)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


def test_noise_method_differs_from_plain_and_ramp_starts_small() -> None:
    data = fake_data()
    finals = {}
    for name, schedule in [("plain", "constant"), ("dnq", "constant"), ("dnq", "ramp")]:
        model = small_cnn()
        run(create_method(MethodConfig(method=name, w_bits=2, a_bits=2, noise_mult=3.0, schedule=schedule,
                                       ramp_epochs=100, seed=0)), model, make_ctx(model), data)
        finals[(name, schedule)] = torch.cat([p.detach().flatten() for p in model.parameters()])
    d_const = (finals[("dnq", "constant")] - finals[("plain", "constant")]).norm()
    d_ramp = (finals[("dnq", "ramp")] - finals[("plain", "constant")]).norm()
    assert d_const > 0 and d_ramp < d_const  # a 100-epoch ramp keeps the noise tiny here


class Quadratic(nn.Module):
    """loss = 1/2 w^T A w, whatever the input."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w


def test_sam_matches_closed_form_on_quadratic() -> None:
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = m @ m.t() + torch.eye(5, dtype=torch.float64)
    w0 = torch.randn(5, dtype=torch.float64)
    rho, lr = 0.3, 0.1
    g = a @ w0
    e = rho * g / g.norm()
    assert torch.allclose(sam_perturbation([g], rho)[0], e)
    model = Quadratic(a, w0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ctx = StepContext(loss_fn=lambda out, y: out, optimizer=opt, device=torch.device("cpu"), epochs=1,
                      steps_per_epoch=1)
    method = SAMMethod(MethodConfig(method="sam", rho=rho))
    loss = method.training_step(model, torch.zeros(1), torch.zeros(1), ctx)
    assert float(loss) == pytest.approx(float(0.5 * w0 @ a @ w0))
    # SAM: step from w0 with the gradient taken at w0 + e
    assert torch.allclose(model.w.detach(), w0 - lr * (a @ (w0 + e)), atol=1e-12)


def test_sam_perturbation_global_norm_over_tensors() -> None:
    g = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0]])]
    e = sam_perturbation(g, 0.5)
    assert torch.allclose(e[0], torch.tensor([0.3])) and torch.allclose(e[1], torch.tensor([[0.4, 0.0]]))


def test_sam_keeps_batchnorm_stats_single_update() -> None:
    data = fake_data(1)
    stats = []
    for name in ("plain", "sam"):
        model = small_cnn()
        method = create_method(name)
        method.training_step(model.train(), *data[0], make_ctx(model))
        stats.append(model[1].running_mean.clone())
    assert torch.allclose(stats[0], stats[1])


def test_swa_averages_last_epochs_and_updates_bn() -> None:
    model = small_cnn()
    data = fake_data()
    method = create_method(MethodConfig(method="swa", swa_epochs=2))
    ctx = make_ctx(model, epochs=3, batches=data)
    snapshots = []
    orig_end = method.on_epoch_end

    def spy(model_: nn.Module, epoch: int) -> None:
        snapshots.append([p.detach().clone() for p in model_.parameters()])
        orig_end(model_, epoch)

    method.on_epoch_end = spy  # type: ignore[method-assign]
    run(method, model, ctx, data)
    for i, p in enumerate(model.parameters()):  # mean of the weights after epochs 2 and 3
        assert torch.allclose(p, (snapshots[1][i] + snapshots[2][i]) / 2, atol=1e-6)
    # BN statistics recomputed with the averaged weights: the running mean is the mean
    # (over batches) of the batch means of the first conv's output
    conv = model[0]
    with torch.no_grad():
        expected = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x, _ in data]).mean(0)
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["anoise", "dnq", "uniform", "wnoise"])
def test_noise_methods_estimate_batchnorm_statistics_again_without_the_noise(name: str) -> None:
    """The running statistics gathered during training hold the noise's variance; after finalize
    they are those of the clean model over the training batches, computed here in closed form."""
    model = small_cnn()
    data = fake_data()
    method = create_method(MethodConfig(method=name, w_bits=2, a_bits=2, noise_mult=3.0))
    ctx = make_ctx(model, batches=data)
    run(method, model, ctx, data)
    assert not method.handle  # the noise is off, and the model is plain again
    conv, bn = model[0], model[1]
    with torch.no_grad():
        outs = [conv(x) for x, _ in data]
        mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
        var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6, rtol=0)
    assert torch.allclose(bn.running_var, var, atol=1e-6, rtol=1e-6)
    # no training batches: the statistics stay as they are, and a warning says what that leaves
    model2 = small_cnn()
    method2 = create_method(MethodConfig(method=name, w_bits=2, a_bits=2, noise_mult=3.0))
    with pytest.warns(WorkbenchWarning, match="BatchNorm but no training batches"):
        run(method2, model2, make_ctx(model2), data)


def test_swa_every_averages_the_weights_after_each_step_of_the_last_part() -> None:
    # one epoch of 3 batches twice over = 6 steps; swa_start_frac 0.5 -> averaging starts after
    # step 3 and, with swa_every=1, takes the weights after steps 4, 5 and 6: a 1-epoch fine-tune
    # gets a real average (per-epoch SWA would keep the last weights only)
    model = small_cnn()
    data = fake_data()
    method = create_method(MethodConfig(method="swa", swa_every=1, swa_start_frac=0.5))
    ctx = make_ctx(model, epochs=2, steps=len(data), batches=data)
    snapshots = []
    orig_step = method.training_step

    def spy(model_, x, y, ctx_):
        loss = orig_step(model_, x, y, ctx_)
        snapshots.append([p.detach().clone() for p in model_.parameters()])
        return loss

    method.training_step = spy  # type: ignore[method-assign]
    run(method, model, ctx, data)
    assert len(snapshots) == 6 and method.n_averaged == 3
    for i, p in enumerate(model.parameters()):
        assert torch.allclose(p, sum(s[i] for s in snapshots[3:]) / 3, atol=1e-6)
    # every second step from the same start: only the weights after step 5 ((5 - 3) % 2 == 0)
    model2 = small_cnn()
    method2 = create_method(MethodConfig(method="swa", swa_every=2, swa_start_frac=0.5))
    run(method2, model2, make_ctx(model2, epochs=2, steps=len(data), batches=data), data)
    assert method2.n_averaged == 1 and method2.state_dict()["step"] == 6


def test_swa_lr_overrides_schedule() -> None:
    model = small_cnn()
    method = create_method(MethodConfig(method="swa", swa_epochs=1, swa_lr=0.123))
    ctx = make_ctx(model, epochs=2, batches=fake_data())
    run(method, model, ctx, fake_data())
    assert ctx.optimizer.param_groups[0]["lr"] == 0.123


def test_config_roundtrip_and_from_cli_like_dict() -> None:
    cfg = MethodConfig(method="dnq", w_bits=3, a_bits=6, noise_mult_w=0.5, exclude=["head"])
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert MethodConfig.from_dict({"method": "dnq", "exclude": "head"}).exclude == ("head",)
    assert create_method(cfg.to_dict()).describe()["noise_mult_w"] == 0.5
    assert cfg.k_w == 0.5 and cfg.k_a == 1.0
    nc = MethodConfig(method="uniform").noise_config()
    assert nc.distribution == "uniform" and nc.weight_noise and nc.act_noise
    nc = MethodConfig(method="wnoise").noise_config()
    assert nc.weight_noise and not nc.act_noise


def test_unknown_method_lists_names() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'dnq'.*Valid method names"):
        create_method("dqn")
    with pytest.raises(ConfigError, match="unknown method option"):
        MethodConfig.from_dict({"method": "dnq", "noise": 1})


@pytest.mark.parametrize("kwargs", [
    {"method": "dnq", "w_bits": 1}, {"method": "dnq", "a_bits": 17}, {"method": "dnq", "noise_mult": -1},
    {"method": "wnoise", "noise_mult_w": -0.5}, {"method": "sam", "rho": 0}, {"method": "sam", "rho": -0.1},
    {"method": "wnoise", "w_bits": None}, {"method": "anoise", "a_bits": None},
    {"method": "dnq", "a_bits": None}, {"method": "uniform", "w_bits": None, "a_bits": None},
    {"method": "swa", "swa_start_frac": 1.0}, {"method": "swa", "swa_epochs": 0}, {"method": "swa", "swa_every": 0},
    {"method": "dnq", "schedule": "cosine"},
])
def test_bad_configs(kwargs) -> None:
    with pytest.raises(ConfigError):
        MethodConfig(**kwargs)


def test_model_without_linear_or_conv() -> None:
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(64))
    for name in ("wnoise", "anoise", "dnq", "uniform"):
        method = create_method(name)
        with pytest.raises(ModelError, match="no Linear/Conv"):
            method.setup(model, make_ctx(model))
