"""Curvature-guided mixed precision: sensitivities against a closed-form Hessian, the exact
solver against brute force, budgets never exceeded, impossible budgets refused, and the
per-layer bit map applied by the PTQ engine."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.ptq import PTQConfig, mixed, quantize_model

DIMS = (3, 5, 2, 4)
OUT = 2


class Parallel(nn.Module):
    """Linear layers on disjoint slices of the input, summed: under a squared loss the Hessian
    diagonal of weight ``W_l[o, j]`` is ``mean_n x_{l,j}^2``, in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, OUT, bias=False) for d in DIMS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(part) for layer, part in zip(self.layers, torch.split(x, DIMS, dim=1)))


def squared(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum(1).mean()


def _setup():
    g = torch.Generator().manual_seed(0)
    model = Parallel().double()
    with torch.no_grad():
        for i, layer in enumerate(model.layers):  # layers of very different weight and input scales
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * (0.2 + i))
    scales = torch.tensor([3.0, 0.5, 2.0, 1.0], dtype=torch.float64).repeat_interleave(torch.tensor(DIMS))
    x = torch.randn(64, sum(DIMS), generator=g, dtype=torch.float64) * scales
    y = torch.randn(64, OUT, generator=g, dtype=torch.float64)
    return model, (x, y)


def _closed_form(model: Parallel, x: torch.Tensor, bits: int) -> list[float]:
    out = []
    for layer, part in zip(model.layers, torch.split(x, DIMS, dim=1)):
        w = layer.weight.detach()
        step = w.abs().amax(1) / (2 ** (bits - 1) - 1)  # per output channel
        h = part.pow(2).mean(0)  # H_ii of W[o, j]: mean x_j^2, the same for every o
        out.append(float(0.5 * ((step**2 / 12)[:, None] * h[None, :]).sum()))
    return out


def test_sensitivities_match_the_closed_form_hessian():
    model, (x, y) = _setup()
    sens = mixed.layer_sensitivities(model, (x, y), loss_fn=squared, ref_bits=4, deflate=40, min_probes=2,
                                     max_probes=2, generator=torch.Generator().manual_seed(1))
    assert [s.name for s in sens] == [f"layers.{i}" for i in range(4)]
    for b in (8, 4, 3, 2):
        expected = _closed_form(model, x, b)
        got = [s.predicted(b) for s in sens]
        assert got == pytest.approx(expected, rel=1e-8), b


def test_allocation_is_the_true_optimum_on_the_closed_form_model():
    model, (x, y) = _setup()
    cands = (8, 4, 3, 2)
    sens = mixed.layer_sensitivities(model, (x, y), loss_fn=squared, deflate=40, min_probes=2, max_probes=2)
    exact = {b: _closed_form(model, x, b) for b in cands}
    params = [d * OUT for d in DIMS]
    for budget in (2.5, 3.0, 3.5, 5.0):
        alloc = mixed.allocate_bits(model, budget=budget, candidates=cands, sensitivities=sens)
        best = min((combo for combo in itertools.product(cands, repeat=4)
                    if sum(p * b for p, b in zip(params, combo)) <= budget * sum(params)),
                   key=lambda c: sum(exact[b][i] for i, b in enumerate(c)))
        assert [alloc.bits[f"layers.{i}"] for i in range(4)] == list(best), budget
        assert alloc.predicted == pytest.approx(sum(exact[b][i] for i, b in enumerate(best)), rel=1e-8)
        assert alloc.average_bits <= budget + 1e-12


@pytest.mark.parametrize("kind", ["bits", "bytes", "bops"])
def test_solver_never_exceeds_the_budget_and_matches_brute_force(kind):
    rng = np.random.default_rng(3)
    cands = (8, 6, 4, 3, 2)
    for trial in range(20):
        n = 5
        sens = [mixed.LayerSensitivity(f"l{i}", int(rng.integers(10, 500)), int(rng.integers(100, 5000)), 4,
                                       float(rng.random()), 0.0) for i in range(n)]
        budget = {"bits": float(rng.uniform(2.2, 7.5)),
                  "bytes": float(rng.uniform(2.2, 7.5)) * sum(s.params for s in sens) / 8,
                  "bops": float(rng.uniform(2.2, 7.5)) * 8 * sum(s.macs for s in sens)}[kind]
        alloc = mixed.allocate_bits(None, budget=budget, candidates=cands, budget_kind=kind, a_bits=8,
                                    sensitivities=sens)
        chosen = [alloc.bits[s.name] for s in sens]
        use = {"bits": alloc.average_bits, "bytes": alloc.size_bytes, "bops": alloc.bops}[kind]
        assert use <= budget * (1 + 1e-12), (trial, use, budget)

        def resource(combo, sens=sens):
            if kind == "bops":
                return sum(s.macs * b * 8 for s, b in zip(sens, combo))
            return sum(s.params * b for s, b in zip(sens, combo)) / (8 if kind == "bytes" else sum(s.params for s in sens))

        feasible = [c for c in itertools.product(cands, repeat=n) if resource(c) <= budget * (1 + 1e-12)]
        best = min(sum(s.predicted(b) for s, b in zip(sens, c)) for c in feasible)
        assert sum(s.predicted(b) for s, b in zip(sens, chosen)) == pytest.approx(best, rel=1e-12), trial


def test_impossible_budgets_are_refused_with_the_reason():
    sens = [mixed.LayerSensitivity("a", 100, 1000, 4, 1.0, 0.0), mixed.LayerSensitivity("b", 50, 500, 4, 2.0, 0.0)]
    with pytest.raises(ConfigError, match="impossible"):
        mixed.allocate_bits(None, budget=1.9, sensitivities=sens)
    with pytest.raises(ConfigError, match="below the smallest"):
        mixed.allocate_bits(None, budget=10, budget_kind="bytes", sensitivities=sens)  # 150 weights need >= 37.5 B
    with pytest.raises(ConfigError, match="a_bits"):
        mixed.allocate_bits(None, budget=1e6, budget_kind="bops", sensitivities=sens)
    with pytest.raises(ConfigError, match="budget_kind"):
        mixed.allocate_bits(None, budget=4, budget_kind="flops", sensitivities=sens)


def test_a_negative_estimate_is_not_read_as_a_reason_to_cut_bits():
    s = mixed.LayerSensitivity("a", 10, 10, 4, 0.0, 0.1, clamped=True)
    assert s.predicted(2) == 0.0


def test_the_engine_quantizes_each_layer_at_its_allocated_width():
    model, (x, _) = _setup()
    model = model.float()
    alloc_bits = {"layers.0": 8, "layers.1": 2, "layers.2": 3}
    cfg = PTQConfig(w_bits=4, a_bits=None, layer_bits=alloc_bits)
    assert cfg.label == "Wmix(4)A32" and cfg == PTQConfig(w_bits=4, a_bits=None, layer_bits=list(alloc_bits.items()))
    qm = quantize_model(model, cfg)
    got = {n: m.w_bits for n, m in qm.model.named_modules() if hasattr(m, "w_bits")}
    assert got == {"layers.0": 8, "layers.1": 2, "layers.2": 3, "layers.3": 4}
    # a 2-bit symmetric grid has 3 levels: the quantized weights of layers.1 take at most 3 values per row
    w = qm.model.get_submodule("layers.1").weight_q
    assert all(len(torch.unique(row)) <= 3 for row in w)
    with pytest.raises(ConfigError, match="not Linear/Conv layers"):
        quantize_model(model, PTQConfig(w_bits=4, a_bits=None, layer_bits={"head": 4}))
    with pytest.raises(ConfigError, match="out of range"):
        PTQConfig(layer_bits={"layers.0": 1})
    assert math.isfinite(float(qm.model(x.float()).sum()))


def test_ptq_command_allocates_within_each_budget_and_evaluates(ptq_cli, one_torch_thread):
    out = ptq_cli("--budget", "3,4.5", "--abits", "8", "--n-calib", "32", "--n-eval", "64", "--observer", "mse")
    allocs, rows = out["allocations"], [r for r in out["rows"] if r["config"] != "FP32"]
    assert [a["budget"] for a in allocs] == [3.0, 4.5] and len(rows) == 2
    for a, r in zip(allocs, rows):
        assert a["average_bits"] <= a["budget"] + 1e-12 and r["average_bits"] == a["average_bits"]
        assert set(a["bits"].values()) <= {8, 6, 4, 3, 2} and r["a_bits"] == 8 and r["config"].startswith("Wmix(")
    assert allocs[0]["predicted"] >= allocs[1]["predicted"]  # more bits never predict more damage
    with pytest.raises(ConfigError, match="--abits"):
        ptq_cli("--budget", "3", "--bits", "W4A4")


def test_budget_slider_moves_the_allocation_and_measures_on_demand():
    from workbench import plots, widgets

    model, (x, y) = _setup()
    model = model.float()
    x, y = x.float(), y.float()
    sens = mixed.layer_sensitivities(model, (x, y), loss_fn=squared,
                                     deflate=40, min_probes=2, max_probes=2)
    app = widgets.BitBudget(model, sens, [x], [(x, y.argmax(1))], a_bits=8, budget=3.0, candidates=(8, 4, 3, 2))
    low = list(app.figure.data[0].y)
    assert app.allocation.average_bits <= 3.0 and "measured" not in app.status.value
    app.budget.value = 6.0  # the slider alone re-solves and redraws, no browser needed
    high = list(app.figure.data[0].y)
    assert app.allocation.average_bits <= 6.0 and sum(high) > sum(low)
    assert app.allocation.predicted <= mixed.allocate_bits(model, budget=3.0, candidates=(8, 4, 3, 2),
                                                           sensitivities=sens).predicted
    res = app.measure()
    assert 0 <= res["accuracy"] <= 100 and "measured accuracy" in app.status.value
    fig = plots.bits_per_layer({"curvature": app.allocation, "uniform": mixed.uniform_allocation(sens, 4)})
    assert [len(t.y) for t in fig.data] == [4, 4] and list(fig.data[1].y) == [4, 4, 4, 4]


# ----------------------------------------------------------------------------- activations

A_OUT = 16


class Orthogonal(nn.Module):
    """Like :class:`Parallel`, but every weight column of every layer is orthogonal to every other
    (columns of one orthogonal matrix, scaled): under the squared loss the Hessian with respect to
    the layers' inputs is then diagonal, ``d2L / d x_{n,l,j}^2 = ||W_l[:, j]||^2 / N``, so each
    input's sigma-weighted trace is ``sigma_l^2 ||W_l||_F^2`` in closed form and Rademacher probes
    are exact: the estimate can be checked for equality, not within a tolerance."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        q, _ = torch.linalg.qr(torch.randn(A_OUT, sum(DIMS), generator=g, dtype=torch.float64))
        cols = torch.split(q, DIMS, dim=1)
        self.layers = nn.ModuleList(nn.Linear(d, A_OUT, bias=False).double() for d in DIMS)
        with torch.no_grad():
            for i, (layer, c) in enumerate(zip(self.layers, cols)):
                layer.weight.copy_(c * (0.5 + i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(part) for layer, part in zip(self.layers, torch.split(x, DIMS, dim=1)))


def _act_setup():
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([3.0, 0.5, 2.0, 1.0], dtype=torch.float64).repeat_interleave(torch.tensor(DIMS))
    x = torch.randn(32, sum(DIMS), generator=g, dtype=torch.float64) * scales + 0.3
    return Orthogonal(), (x, torch.randn(32, A_OUT, generator=g, dtype=torch.float64))


def _act_closed_form(model: Orthogonal, x: torch.Tensor, bits: int) -> list[float]:
    out = []
    for layer, part in zip(model.layers, torch.split(x, DIMS, dim=1)):
        lo, hi = min(float(part.min()), 0.0), max(float(part.max()), 0.0)  # the grid contains 0
        sigma2 = ((hi - lo) / (2**bits - 1)) ** 2 / 12
        out.append(0.5 * sigma2 * float(layer.weight.detach().pow(2).sum()))
    return out


def test_activation_sensitivities_match_the_closed_form_input_hessian():
    model, (x, y) = _act_setup()
    sens = mixed.activation_sensitivities(model, (x, y), loss_fn=squared, ref_bits=8, min_probes=3, max_probes=3,
                                          generator=torch.Generator().manual_seed(1))
    assert [s.name for s in sens] == [f"layers.{i}" for i in range(4)]
    assert [s.params for s in sens] == list(DIMS) and {s.kind for s in sens} == {"activation"}
    for b in (8, 6, 4, 3):
        assert [s.predicted(b) for s in sens] == pytest.approx(_act_closed_form(model, x, b), rel=1e-5), b
    assert all(s.stderr_ref == pytest.approx(0.0, abs=1e-6 * s.predicted_ref) for s in sens)  # exact probes


def test_activation_allocation_is_the_true_optimum_within_its_own_budget():
    model, (x, y) = _act_setup()
    cands, a_cands = (8, 4), (8, 6, 4, 3)
    w_sens = mixed.layer_sensitivities(model, (x, y), loss_fn=squared, deflate=60, min_probes=2, max_probes=2)
    a_sens = mixed.activation_sensitivities(model, (x, y), loss_fn=squared, min_probes=2, max_probes=2)
    exact = {b: _act_closed_form(model, x, b) for b in a_cands}
    for a_budget in (3.5, 4.5, 6.0):
        alloc = mixed.allocate_bits(model, budget=6.0, candidates=cands, a_candidates=a_cands, a_budget=a_budget,
                                    sensitivities=w_sens, a_sensitivities=a_sens)
        best = min((c for c in itertools.product(a_cands, repeat=4)
                    if sum(d * b for d, b in zip(DIMS, c)) <= a_budget * sum(DIMS)),
                   key=lambda c: sum(exact[b][i] for i, b in enumerate(c)))
        assert [alloc.a_layer_bits[f"layers.{i}"] for i in range(4)] == list(best), a_budget
        assert alloc.average_a_bits <= a_budget + 1e-12
        w_part = sum(s.predicted(alloc.bits[s.name]) for s in w_sens)
        assert alloc.predicted == pytest.approx(w_part + sum(exact[b][i] for i, b in enumerate(best)), rel=1e-5)
        cfg = alloc.config(observer="minmax")
        assert dict(cfg.layer_a_bits) == alloc.a_layer_bits and cfg.label.startswith("Wmix(") and "Amix(" in cfg.label


def test_a_bops_budget_prices_weight_and_input_widths_together():
    rng = np.random.default_rng(5)
    cands, a_cands = (8, 4, 2), (8, 6, 4)
    for trial in range(10):
        sens = [mixed.LayerSensitivity(f"l{i}", int(rng.integers(10, 500)), int(rng.integers(100, 5000)), 4,
                                       float(rng.random()), 0.0) for i in range(4)]
        a_sens = [mixed.LayerSensitivity(s.name, int(rng.integers(10, 500)), s.macs, 8, float(rng.random()), 0.0,
                                         kind="activation") for s in sens]
        budget = float(rng.uniform(10, 60)) * sum(s.macs for s in sens)
        alloc = mixed.allocate_bits(None, budget=budget, budget_kind="bops", candidates=cands, a_candidates=a_cands,
                                    sensitivities=sens, a_sensitivities=a_sens)
        assert alloc.bops <= budget
        options = list(itertools.product(cands, a_cands))
        feasible = [c for c in itertools.product(options, repeat=4)
                    if sum(s.macs * w * a for s, (w, a) in zip(sens, c)) <= budget]
        best = min(sum(s.predicted(w) + sa.predicted(a) for s, sa, (w, a) in zip(sens, a_sens, c)) for c in feasible)
        assert alloc.predicted == pytest.approx(best, rel=1e-12), trial


def test_per_layer_activation_widths_reach_the_engine_and_bad_requests_are_refused():
    model, (x, _) = _setup()
    model = model.float()
    cfg = PTQConfig(w_bits=8, a_bits=8, layer_a_bits={"layers.1": 3, "layers.2": 4})
    assert cfg.label == "W8Amix(8)"
    qm = quantize_model(model, cfg, [x.float()])
    got = {n: m.input_quant.bits for n, m in qm.model.named_modules() if getattr(m, "input_quant", None) is not None}
    assert got == {"layers.0": 8, "layers.1": 3, "layers.2": 4, "layers.3": 8}
    with pytest.raises(ConfigError, match="not Linear/Conv layers"):
        quantize_model(model, PTQConfig(layer_a_bits={"head": 4}), [x.float()])
    with pytest.raises(ConfigError, match="a_bits is None"):
        quantize_model(model, PTQConfig(a_bits=None, layer_a_bits={"layers.0": 4}), [x.float()])
    sens = [mixed.LayerSensitivity("a", 100, 1000, 4, 1.0, 0.0)]
    with pytest.raises(ConfigError, match="a_budget"):
        mixed.allocate_bits(None, budget=4, a_candidates=(8, 4), sensitivities=sens)
    with pytest.raises(ConfigError, match="a_candidates"):
        mixed.allocate_bits(None, budget=4, a_budget=6, sensitivities=sens)
    with pytest.raises(ConfigError, match="impossible"):
        mixed.allocate_bits(None, budget=4, a_candidates=(8, 4), a_budget=3, sensitivities=sens,
                            a_sensitivities=[mixed.LayerSensitivity("a", 10, 1000, 8, 1.0, 0.0, kind="activation")])


def test_ptq_command_allocates_input_widths_within_their_budget(ptq_cli, one_torch_thread):
    out = ptq_cli("--budget", "4", "--a-budget", "5", "--a-candidates", "8,4", "--n-calib", "32", "--n-eval", "64")
    (alloc,), (row,) = out["allocations"], [r for r in out["rows"] if r["config"] != "FP32"]
    assert alloc["average_a_bits"] <= 5 + 1e-12 and set(alloc["a_layer_bits"].values()) <= {8, 4}
    assert set(alloc["a_layer_bits"]) == set(alloc["bits"]) and row["average_a_bits"] == alloc["average_a_bits"]
    assert "Amix(" in row["config"]
    with pytest.raises(ConfigError, match="--a-budget"):
        ptq_cli("--budget", "4", "--a-candidates", "8,4")


@pytest.mark.parametrize("extra", [{}, {"bias_correction": True}, {"reconstruction": "adaround", "recon_iters": 1},
                                   {"reconstruction": "brecq", "qdrop": 0.5, "recon_iters": 1}, {"repq": True}],
                         ids=["rtn", "bc", "adaround", "qdrop", "repq"])
def test_every_strong_ptq_option_keeps_the_per_layer_widths(extra, one_torch_thread):
    from workbench import zoo

    model, _, _ = zoo.load_init("zoo:vit-micro-mini-s0")
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cfg = PTQConfig(w_bits=4, a_bits=4, observer="mse", n_calib=8, layer_bits={"blocks.0.attn.qkv": 2},
                    layer_a_bits={"blocks.0.mlp.fc2": 3, "head": 6}, **extra)
    mods = dict(quantize_model(model, cfg, [x]).model.named_modules())
    assert mods["blocks.0.attn.qkv"].w_bits == 2 and mods["blocks.1.attn.qkv"].w_bits == 4
    # a 2-bit symmetric grid: at most 3 values per output row, whatever the rounding method
    assert all(len(torch.unique(row)) <= 3 for row in mods["blocks.0.attn.qkv"].weight_q)
    assert mods["blocks.0.mlp.fc2"].input_quant.bits == 3 and mods["head"].input_quant.bits == 6
    assert mods["blocks.1.mlp.fc2"].input_quant.bits == 4
