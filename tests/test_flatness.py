"""Flatness analysis against exact Hessians of models small enough to write the Hessian down."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from workbench import flatness as fl
from workbench import quant
from workbench.errors import ConfigError, ModelError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.conv(x)))
        return self.fc(self.drop(F.avg_pool2d(h, 2).flatten(1)))


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    m = _CNN().double()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        m.bn.running_mean.copy_(torch.tensor([0.1, -0.2]))
        m.bn.running_var.copy_(torch.tensor([0.5, 2.0]))
    return m


def _data(model: nn.Module, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if isinstance(model, nn.Sequential) else (n, 1, 8, 8)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


_EXACT: dict = {}


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None):
    """Full Hessian of the eval-mode cross-entropy w.r.t. the flattened (selected) parameters (cached)."""
    key = (type(model).__name__, float(sum(p.detach().sum() for p in model.parameters())), float(x.sum()),
           tuple(names or ()))
    if key not in _EXACT:
        _EXACT[key] = _exact_hessian(model, x, y, names)
    return _EXACT[key]


def _exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None):
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    rest = {n: p.detach() for n, p in named.items() if n not in names} | dict(model.named_buffers())
    was = model.training
    model.eval()

    def f(theta: torch.Tensor) -> torch.Tensor:
        p = {n: c.view(s) for n, c, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, (p | rest,), (x,)), y)

    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    H = torch.autograd.functional.hessian(f, theta0, vectorize=True)
    model.train(was)
    return H, theta0


MODELS = [pytest.param(_mlp, id="mlp"), pytest.param(_cnn, id="cnn")]


@pytest.mark.parametrize("make", MODELS)
def test_hvp_methods_equal_exact(make):
    model = make()
    x, y = _data(model)
    H, _ = exact_hessian(model, x, y)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fl.hessian._CHOSEN_METHOD.clear()  # so that auto runs its timing trial here
    for method in ("fwd", "dbl", "auto"):
        with fl.LossHessian(model, (x, y), method=method) as op:
            hv1, hv2 = op.hvp(v), op.hvp(v)  # auto: the first two products use different methods
        torch.testing.assert_close(hv1, H @ v, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(hv2, H @ v, rtol=1e-9, atol=1e-11)


def test_auto_reuses_its_choice_for_the_same_layout_only():
    model = _mlp()
    x, y = _data(model)
    fl.hessian._CHOSEN_METHOD.clear()
    with fl.LossHessian(model, (x, y)) as op:
        assert op.method_used == "auto"
        v = torch.ones(op.numel, dtype=torch.float64)
        op.hvp(v), op.hvp(v)
        chosen = op.method_used
    assert chosen in ("fwd", "dbl")
    with fl.LossHessian(_mlp(), _data(model, seed=1)) as op:  # same layout and shapes: no new trial
        assert op.method_used == chosen
    with fl.LossHessian(model, _data(model, n=8)) as op:  # other data shapes: a new trial
        assert op.method_used == "auto"
    with fl.LossHessian(model, (x, y), params=["0.*"]) as op:  # other parameters: a new trial
        assert op.method_used == "auto"


def test_hvp_over_several_batches_is_the_sample_weighted_mean():
    model = _mlp()
    x, y = _data(model, n=20)
    H, _ = exact_hessian(model, x, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for method in ("fwd", "dbl"):
        with fl.LossHessian(model, [(x[:12], y[:12]), (x[12:], y[12:])], method=method) as op:
            torch.testing.assert_close(op.hvp(v), H @ v, rtol=1e-9, atol=1e-11)


def test_parameter_subset_is_the_diagonal_block():
    model = _cnn()
    x, y = _data(model)
    names = ["conv.weight", "fc.*"]
    with fl.LossHessian(model, (x, y), params=names) as op:
        assert op.names == ["conv.weight", "fc.weight", "fc.bias"]
        Hs, _ = exact_hessian(model, x, y, op.names)
        v = torch.randn(op.numel, dtype=torch.float64)
        torch.testing.assert_close(op.hvp(v), Hs @ v, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("make", MODELS)
def test_top_eigenvalues_match_exact(make):
    model = make()
    x, y = _data(model)
    H, _ = exact_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(H).flip(0)
    res = fl.top_eigenvalues(model, (x, y), k=3, tol=1e-6, max_iter=300, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.algorithm == "lanczos" and res.hvps == res.iterations
    # The models are float64 and Lanczos (full reorthogonalization) stops once every Ritz residual
    # bound |beta s| is below tol * |theta|; that bound also bounds the distance of each Ritz value
    # to an eigenvalue, so tol=1e-6 promises 1e-6 relative (in practice ~1e-13 on 57 / 123 params).
    assert len(res.eigenvalues) == 3
    for got, want in zip(res.eigenvalues, exact[:3].tolist()):
        assert got == pytest.approx(want, rel=1e-6)
    # power iteration (PyHessian's algorithm) finds the largest-magnitude eigenvalue; at tol=1e-8 on
    # the Rayleigh quotient's change it is within a few 1e-8 (eigenvalue ratio ~0.85 here)
    pw = fl.top_eigenvalues(model, (x, y), k=1, algorithm="power", tol=1e-8, max_iter=2000,
                            generator=torch.Generator().manual_seed(0))
    assert pw.converged
    assert abs(pw.eigenvalues[0]) == pytest.approx(float(exact.abs().max()), rel=1e-6)


def _assert_layers_within_stderr(res, model, x, y, H) -> None:
    """Each layer's estimated diagonal-block trace is within 4 standard errors of the exact one."""
    with fl.LossHessian(model, (x, y)) as op:
        blocks = op.blocks()
    assert set(res.per_layer) == set(blocks)
    for layer, sl in blocks.items():
        want = float(H.diagonal()[sl].sum())
        got = res.per_layer[layer]
        assert abs(got["estimate"] - want) <= 4 * got["stderr"] + 1e-9 * abs(want)


@pytest.mark.parametrize("make", MODELS)
def test_hutchinson_trace_within_its_stderr(make):
    model = make()
    x, y = _data(model)
    H, _ = exact_hessian(model, x, y)
    exact = float(H.trace())
    # z^T H z has a relative std of 1-1.5 per probe here, hence many (vectorized) probes
    res = fl.hutchinson_trace(model, (x, y), tol=0.01, max_probes=6000, block=2000, per_layer=True, deflate=0,
                              generator=torch.Generator().manual_seed(0))
    assert res.probes == 6000 and res.rel_stderr < 0.025
    assert abs(res.estimate - exact) <= 3 * res.stderr
    assert res.estimate == pytest.approx(exact, rel=0.03)
    # per-layer diagonal blocks, estimated from the same probes
    _assert_layers_within_stderr(res, model, x, y, H)


@pytest.mark.parametrize("make", MODELS)
def test_deflated_trace_within_its_stderr_per_layer_too(make):
    model = make()
    x, y = _data(model)
    H, _ = exact_hessian(model, x, y)
    exact = float(H.trace())
    res = fl.hutchinson_trace(model, (x, y), tol=1e-9, min_probes=400, max_probes=400, block=400, deflate=6,
                              per_layer=True, generator=torch.Generator().manual_seed(0))
    assert res.deflated == 6 and res.probes == 400 and res.hvps == 406
    # the deflated part is tr(Q^T H Q) over an orthonormal basis: it cannot exceed the sum of the top-6
    ev = torch.linalg.eigvalsh(H).flip(0)
    assert res.deflated_part <= float(ev[:6].sum()) + 1e-9
    assert abs(res.estimate - exact) <= 3 * res.stderr
    _assert_layers_within_stderr(res, model, x, y, H)
    assert sum(v["estimate"] for v in res.per_layer.values()) == pytest.approx(res.estimate, rel=1e-9)


def test_deflation_cuts_the_standard_error_at_equal_products():
    # least squares with inputs near a 3-dimensional subspace: H = (2/n) [X 1]^T [X 1] (closed form) has
    # three outlying eigenvalues that carry most of ||H||_F^2, like the class outliers of a network Hessian
    g = torch.Generator().manual_seed(0)
    n, d = 64, 40
    X = torch.randn(n, 3, generator=g, dtype=torch.float64) @ (5 * torch.randn(3, d, generator=g,
                                                                                dtype=torch.float64))
    X += 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    Xa = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = 2 / n * Xa.T @ Xa
    ev = torch.linalg.eigvalsh(H).flip(0)
    assert float((ev[:3] ** 2).sum() / (ev**2).sum()) > 0.95
    kw = {"loss_fn": F.mse_loss, "tol": 1e-9, "block": 40}
    plain = fl.hutchinson_trace(model, (X, t), min_probes=40, max_probes=40, deflate=0,
                                generator=torch.Generator().manual_seed(2), **kw)
    defl = fl.hutchinson_trace(model, (X, t), min_probes=34, max_probes=34, deflate=6,
                               generator=torch.Generator().manual_seed(2), **kw)
    assert plain.hvps == defl.hvps == 40
    assert defl.stderr < plain.stderr / 4
    for res in (plain, defl):
        assert abs(res.estimate - float(H.trace())) <= 3 * res.stderr


def test_deflation_over_every_direction_is_exact():
    model = _mlp()
    x, y = _data(model)
    H, _ = exact_hessian(model, x, y)
    n = H.shape[0]
    res = fl.hutchinson_trace(model, (x, y), deflate=n + 5, min_probes=2, max_probes=2,
                              generator=torch.Generator().manual_seed(0))
    assert res.deflated <= n
    assert res.estimate == pytest.approx(float(H.trace()), rel=1e-7)
    assert res.stderr == pytest.approx(0.0, abs=1e-9 * abs(res.estimate)) and res.converged
    with pytest.raises(ConfigError, match="deflate"):
        fl.hutchinson_trace(model, (x, y), deflate=-1)


def test_trace_stops_at_tolerance_and_reports_unconverged():
    model = _mlp()
    x, y = _data(model)
    loose = fl.hutchinson_trace(model, (x, y), tol=0.5, min_probes=3, max_probes=500,
                                generator=torch.Generator().manual_seed(0))
    assert loose.converged and loose.probes < 500
    capped = fl.hutchinson_trace(model, (x, y), tol=1e-9, min_probes=2, max_probes=5,
                                 generator=torch.Generator().manual_seed(0))
    assert not capped.converged and capped.probes == 5 and len(capped.samples) == 5


def test_same_generator_seed_same_estimate():
    model = _mlp()
    x, y = _data(model)
    a = fl.hutchinson_trace(model, (x, y), max_probes=12, generator=torch.Generator().manual_seed(5))
    b = fl.hutchinson_trace(model, (x, y), max_probes=12, generator=torch.Generator().manual_seed(5))
    # equal up to rounding: "auto" may pick a different (equally exact) HVP method on each run
    assert a.samples == pytest.approx(b.samples, rel=1e-9)


@pytest.mark.parametrize("make,w_bits", [pytest.param(_mlp, 3, id="mlp-w3"), pytest.param(_cnn, 4, id="cnn-w4")])
def test_sigma_weighted_trace_matches_exact_diagonal(make, w_bits):
    model = make()
    x, y = _data(model)
    names = fl.quantized_weight_names(model)
    H, _ = exact_hessian(model, x, y, names)
    sigma = fl.weight_sigma(model, names, w_bits)
    # sigma is the per-output-channel rounding std of quant's symmetric quantizer
    named = dict(model.named_parameters())
    w = named[names[0]].detach()
    qmax = 2 ** (w_bits - 1) - 1
    want_sd = w.abs().flatten(1).amax(1) / qmax / math.sqrt(12)
    torch.testing.assert_close(sigma[: w.numel()].view(w.shape[0], -1)[:, 0], want_sd)
    exact = float((sigma**2 * H.diagonal()).sum())
    pred = fl.weight_quant_prediction(model, (x, y), w_bits=w_bits, tol=0.01, max_probes=6000, block=2000,
                                      noise_samples=2, generator=torch.Generator().manual_seed(1))
    assert abs(pred.sigma_trace - exact) <= 3 * pred.sigma_trace_stderr
    assert pred.sigma_trace == pytest.approx(exact, rel=0.03)
    assert pred.predicted == pytest.approx(pred.sigma_trace / 2)
    # measured: the loss of a really quantized copy
    q = copy.deepcopy(model).eval()
    with torch.no_grad():
        for mod in q.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.weight.copy_(quant.fake_quantize(mod.weight, quant.weight_qparams(mod.weight, w_bits)))
        qloss = float(F.cross_entropy(q(x), y))
        base = float(F.cross_entropy(copy.deepcopy(model).eval()(x), y))
    assert pred.measured_rtn == pytest.approx(qloss - base, abs=1e-12)
    assert pred.clean_loss == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("zero_channel", [False, True], ids=["proportional", "clamped-channel"])
def test_several_widths_share_one_trace_only_where_their_sigmas_are_proportional(zero_channel, monkeypatch):
    from workbench.flatness import prediction

    model = _mlp()
    if zero_channel:  # an all-zero output channel: its step is clamped alike at every width
        with torch.no_grad():
            model[0].weight[2].zero_()
    x, y = _data(model)
    names = fl.quantized_weight_names(model)
    H, _ = exact_hessian(model, x, y, names)
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return fl.hutchinson_trace(*args, **kwargs)

    monkeypatch.setattr(prediction, "hutchinson_trace", counting)
    n = sum(dict(model.named_parameters())[k].numel() for k in names)  # 48: deflation spans them all
    preds = fl.weight_quant_predictions(model, (x, y), w_bits=[4, 3, 2], deflate=n, min_probes=2, max_probes=2,
                                        noise_samples=2, generator=torch.Generator().manual_seed(0))
    assert [p.w_bits for p in preds] == [4, 3, 2]
    assert len(calls) == (3 if zero_channel else 1)
    for p in preds:  # each width's sigma-weighted trace is the exact sum_i sigma_i^2 H_ii
        sigma = fl.weight_sigma(model, names, p.w_bits)
        exact = float((sigma**2 * H.diagonal()).sum())
        assert p.sigma_trace == pytest.approx(exact, rel=1e-8)
        assert p.predicted == pytest.approx(exact / 2, rel=1e-8)
        single = fl.weight_quant_prediction(model, (x, y), w_bits=p.w_bits, deflate=n, min_probes=2, max_probes=2,
                                            noise_samples=0)
        assert p.measured_rtn == pytest.approx(single.measured_rtn, abs=1e-12)
        assert p.first_order == pytest.approx(single.first_order, abs=1e-12)
    if not zero_channel:  # per-channel steps absmax / (2^(b-1) - 1): sigma_3 = (7/3) sigma_4, sigma_2 = 7 sigma_4
        assert preds[1].sigma_trace / preds[0].sigma_trace == pytest.approx((7 / 3) ** 2, rel=1e-9)
        assert preds[2].sigma_trace / preds[0].sigma_trace == pytest.approx(49.0, rel=1e-9)
    with pytest.raises(ConfigError, match="w_bits is empty"):
        fl.weight_quant_predictions(model, (x, y), w_bits=[])


def test_spectral_density_is_a_probability_density_with_the_right_trace():
    model = _mlp()
    x, y = _data(model)
    H, _ = exact_hessian(model, x, y)
    ev = torch.linalg.eigvalsh(H)
    d = fl.spectral_density(model, (x, y), runs=3, steps=200, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor(d.grid)
    dens = torch.tensor(d.density)
    area = float(torch.trapezoid(dens, grid))
    assert area == pytest.approx(1.0, rel=0.02)
    assert max(max(n) for n in d.nodes) == pytest.approx(float(ev.max()), rel=1e-6)
    assert min(min(n) for n in d.nodes) == pytest.approx(float(ev.min()), rel=1e-6, abs=1e-9)
    for w in d.weights:
        assert sum(w) == pytest.approx(1.0, rel=1e-6)


def test_sharpness():
    model = _mlp()
    x, y = _data(model)
    asc = fl.sharpness_ascent(model, (x, y), eps=0.05, steps=4)
    assert asc.increase > 0 and asc.kind == "ascent"
    with fl.LossHessian(model, (x, y)) as op:
        g = op.gradient()
        # a step of eps along the gradient is SAM's perturbation: ascent finds at least that
        sam = op.perturbed_loss(0.05 * g / g.norm()) - float(op.loss())
    assert asc.increase >= sam - 1e-12
    rel = fl.sharpness_ascent(model, (x, y), eps=0.05, steps=2, relative=True)
    assert rel.relative and rel.increase >= 0
    # small Gaussian noise: mean increase ~ 1/2 sigma^2 tr(H) (+ zero-mean gradient term)
    H, _ = exact_hessian(model, x, y)
    s = 1e-3
    gs = fl.sharpness_gaussian(model, (x, y), sigma=s, samples=400, generator=torch.Generator().manual_seed(0))
    assert abs(gs.increase - 0.5 * s**2 * float(H.trace())) <= 4 * gs.stderr


def test_spearman():
    assert fl.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert fl.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]
    assert fl.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(fl.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(fl.spearman([1], [2]))
    with pytest.raises(ConfigError):
        fl.spearman([1, 2], [1])


def test_spearman_matches_scipy_with_ties_and_nans():
    stats = pytest.importorskip("scipy.stats")  # a scikit-learn dependency, so normally there
    g = torch.Generator().manual_seed(0)
    for n in (3, 5, 12):
        for _ in range(20):
            # few distinct values: many ties in both inputs
            x = torch.randint(0, 4, (n,), generator=g).tolist()
            y = torch.randint(0, 4, (n,), generator=g).tolist()
            want = _scipy_spearman(stats, x, y)
            got = fl.spearman(x, y)
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12, abs=1e-12)
    # NaN pairs are dropped, not ranked
    assert fl.spearman([1.0, math.nan, 3.0, 2.0], [1.0, 5.0, 2.0, 3.0]) == pytest.approx(0.5)


def _scipy_spearman(stats, x, y) -> float:
    import warnings

    keep = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(keep) < 2:
        return math.nan
    with warnings.catch_warnings():  # constant input: scipy warns and returns NaN, as fl.spearman does
        warnings.simplefilter("ignore")
        return float(stats.spearmanr([a for a, _ in keep], [b for _, b in keep])[0])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def test_report_leaves_model_unchanged_and_restores_modes():
    model = _cnn().train()
    model.drop.eval()  # a mixed state must be restored flag by flag
    before = _snapshot(model)
    x, y = _data(model)
    x_before = x.clone()
    rep = fl.flatness_report(model, (x, y), w_bits=(4, 3), a_bits=8, eig=2, density=True, per_layer=True,
                             max_probes=4, eig_max_iter=20)
    after = model.state_dict(keep_vars=True)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert model.training and model.conv.training and model.bn.training and not model.drop.training
    assert torch.equal(x, x_before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())
    for key in ("loss", "accuracy", "top_eigenvalues", "trace", "density", "sharpness", "quant", "quant_act",
                "hvp_method"):
        assert key in rep
    assert set(rep["quant"]) == {"W4", "W3"}
    import json

    json.dumps(rep)  # plain, JSON-able


def test_damage_table_ranks_measures():
    x, y = _data(_mlp())
    models = {}
    for i, scale in enumerate([0.5, 0.75, 1.0, 1.5, 2.0]):
        m = _mlp()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
        models[f"m{i}"] = m
    few = dict(list(models.items())[:2])
    refused = fl.damage_table(few, (x, y), w_bits=(4,), max_probes=5, eig=0, sharpness=False)
    assert refused["spearman"] == {} and "no rank correlation" in refused["spearman_note"]
    assert len(refused["rows"]) == 2  # the measurements themselves are still there
    out = fl.damage_table(models, (x, y), w_bits=(4,), max_probes=5, eig=1, eig_max_iter=20, sharpness=False)
    assert len(out["rows"]) == fl.MIN_RANK_MODELS
    assert set(out["spearman"]["W4"]) == set(fl.MEASURES)
    stats = pytest.importorskip("scipy.stats")
    rows = out["rows"]
    for key, target in (("spearman", "measured_increase"), ("spearman_acc", "acc_drop")):
        for measure, got in out[key]["W4"].items():
            want = _scipy_spearman(stats, [r[measure] for r in rows], [r[target] for r in rows])
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12), (key, measure)
    # the measures that are always computed give a real correlation, not NaN
    for measure in ("sigma_trace", "predicted_increase", "trace"):
        assert not math.isnan(out["spearman"]["W4"][measure]), measure


def test_timm_vit_fused_attention_restored_and_hvp_consistent():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16,
                                       depth=1, num_heads=2)
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in attn:
        m.fused_attn = True  # as on a machine where timm picks the fused kernel
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    before = _snapshot(model)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
    outs = []
    for method in ("fwd", "dbl"):
        with fl.LossHessian(model, (x, y), method=method) as op:
            outs.append(op.hvp(v))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-5)
    assert all(m.fused_attn for m in attn)
    assert all(torch.equal(v, model.state_dict(keep_vars=True)[k]) for k, v in before.items())
    assert model.training


def test_bad_inputs_raise_clear_errors():
    model = _mlp()
    x, y = _data(model)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ModelError, match="no parameters requiring grad"):
        fl.hutchinson_trace(frozen, (x, y))
    with pytest.raises(ConfigError, match="size 0"):
        fl.top_eigenvalues(model, (x[:0], y[:0]))
    with pytest.raises(ConfigError):
        fl.top_eigenvalues(model, [])
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="number of parameters"):
        fl.top_eigenvalues(model, (x, y), k=n + 1)
    with pytest.raises(ConfigError):
        fl.top_eigenvalues(model, (x, y), k=0)
    with pytest.raises(ModelError, match="matches"):
        fl.LossHessian(model, (x, y), params="nope.*")
    with pytest.raises(ConfigError):
        fl.LossHessian(model, (x, y), method="magic")
    with pytest.raises(ConfigError):
        fl.weight_quant_prediction(model, (x, y), w_bits=1)
    with fl.LossHessian(model, (x, y)) as op, pytest.raises(ConfigError, match="shape"):
        op.hvp(torch.zeros(3, dtype=torch.float64))


def test_activation_sigma_trace_matches_exact_input_hessian():
    model = _mlp()
    x, y = _data(model)
    l0, l2 = model[0], model[2]
    h = torch.tanh(l0(x)).detach()
    qp0 = quant.activation_qparams(float(x.min()), float(x.max()), 4)
    qp2 = quant.activation_qparams(float(h.min()), float(h.max()), 4)

    def loss_of(d: torch.Tensor) -> torch.Tensor:
        d0, d2 = d[: x.numel()].view_as(x), d[x.numel():].view_as(h)
        return F.cross_entropy(l2(torch.tanh(l0(x + d0)) + d2), y)

    H = torch.autograd.functional.hessian(loss_of, torch.zeros(x.numel() + h.numel(), dtype=torch.float64),
                                          vectorize=True)
    s2 = torch.cat([torch.full((x.numel(),), float(qp0.noise_std) ** 2),
                    torch.full((h.numel(),), float(qp2.noise_std) ** 2)]).double()
    exact = float((s2 * H.diagonal()).sum())
    res = fl.activation_quant_prediction(model, (x, y), a_bits=4, tol=0.01, max_probes=3000, block=1000, noise_samples=2,
                                         generator=torch.Generator().manual_seed(0))
    assert res.layers == 2
    assert abs(res.sigma_trace - exact) <= 3 * res.sigma_trace_stderr
    assert res.sigma_trace == pytest.approx(exact, rel=0.03)
    with torch.no_grad():
        hq = torch.tanh(l0(quant.fake_quantize(x, qp0)))
        qloss = float(F.cross_entropy(l2(quant.fake_quantize(hq, qp2)), y))
        base = float(F.cross_entropy(model(x), y))
    assert res.measured_rtn == pytest.approx(qloss - base, abs=1e-9)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_cpu_and_leaves_model_on_cpu():
    model = _cnn()
    x, y = _data(model)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with fl.LossHessian(model, (x, y), device="cpu") as op:
        want = op.hvp(v)
    for method in ("fwd", "dbl"):
        with fl.LossHessian(model, (x, y), device="cuda", method=method) as op:
            got = op.hvp(v)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-8, atol=1e-10)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_ritz_values_converge_to_the_extreme_eigenvalues_first():
    # a bulk plus three outliers: Lanczos finds the outliers in far fewer steps than the dimension
    g = torch.Generator().manual_seed(1)
    B = torch.randn(120, 120, generator=g, dtype=torch.float64)
    M = B @ B.T / 120 + torch.diag(torch.cat([torch.tensor([30.0, 20.0, 12.0], dtype=torch.float64),
                                              torch.zeros(117, dtype=torch.float64)]))
    exact = torch.linalg.eigvalsh(M).flip(0)
    few = fl.ritz_values(M, 3, generator=torch.Generator().manual_seed(0))
    many = fl.ritz_values(M, 25, generator=torch.Generator().manual_seed(0))
    assert len(few) == 3 and len(many) == 25
    assert (many[:3] - exact[:3]).abs().max() < 1e-8 * exact[0]
    assert (few[:3] - exact[:3]).abs().max() > 1e-3  # 3 steps are not enough: the test can tell
    # every Ritz value lies inside the spectrum (Cauchy interlacing)
    assert many.max() <= exact[0] + 1e-9 and many.min() >= exact[-1] - 1e-9
    with pytest.raises(ConfigError, match="symmetric"):
        fl.ritz_values(torch.randn(4, 5, dtype=torch.float64), 2)


def test_accuracy_is_a_percentage_in_flatness_landscapes_and_training() -> None:
    """One unit everywhere: top-1 accuracy in percent, so a drop is in points. The reference is
    counted by hand; train.evaluate, the flatness report, its RTN prediction and the landscape
    must all give the same number (and the same drop)."""
    from workbench.batch.finetune_study import curvature_rows
    from workbench.flatness import flatness_report
    from workbench.landscape import landscape_1d
    from workbench.train import evaluate

    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    with torch.no_grad():
        by_hand = 100.0 * int((model(x).argmax(-1) == y).sum()) / len(y)
    assert 0 < by_hand < 100 and by_hand != 1.0
    assert evaluate(model, [(x, y)])["accuracy"] == pytest.approx(by_hand, abs=1e-9)
    report = flatness_report(model, [(x, y)], w_bits=[3], trace=False, eig=0, sharpness=False)
    assert report["accuracy"] == pytest.approx(by_hand, abs=1e-9)
    q = report["quant"]["W3"]
    assert q["clean_accuracy"] == pytest.approx(by_hand, abs=1e-9) and 0 <= q["quant_accuracy"] <= 100
    line = landscape_1d(model, (x, y), steps=3, span=(-0.5, 0.5), progress=False,
                        generator=torch.Generator().manual_seed(0))
    assert line.accuracies[1] == pytest.approx(by_hand, abs=1e-9)  # alpha = 0: the model itself
    # the study's curvature table: the drop in points, from either record of the unit
    new = curvature_rows({}, report, {})[0]["acc_drop"]
    before = {k: v for k, v in q.items() if k not in ("clean_accuracy", "quant_accuracy")}
    before.update(clean_acc=q["clean_accuracy"] / 100, quant_acc=q["quant_accuracy"] / 100)  # as stored before
    old = curvature_rows({}, {**report, "quant": {"W3": before}}, {})[0]["acc_drop"]
    assert new == pytest.approx(q["clean_accuracy"] - q["quant_accuracy"]) and old == pytest.approx(new)
