"""Curvature-guided mixed precision: which layers can take fewer weight bits.

Per Linear/Conv layer ``l`` the second-order model predicts the loss increase of rounding its
weights at ``b`` bits as ``p_l(b) = 1/2 sum_{i in l} sigma_i(b)^2 H_ii``, with ``sigma_i(b)`` the
rounding-noise std ``step/sqrt(12)`` of the weight's output channel. The per-channel step is
``max|w_c| / (2^(b-1) - 1)``, so ``p_l(b) = p_l(r) * ((2^(r-1) - 1) / (2^(b-1) - 1))^2`` for a
reference width ``r``: one Hutchinson run of the sigma-weighted trace at ``r``, split by layer
(the same probes give every layer's diagonal block, deflated as in
:func:`workbench.flatness.hutchinson_trace`), prices every candidate width of every layer.

:func:`allocate_bits` then picks one width per layer minimizing the summed prediction under a
budget (average weight bits, model bytes, or bit-operations), exactly: a dynamic program over
the layers on the integer resource (a multiple-choice knapsack), not a greedy heuristic.
Activations are priced the same way (:func:`activation_sensitivities`): the Hessian with respect
to each Linear/Conv input, weighted by that input's per-tensor rounding variance, split by layer
from one Hutchinson run of :func:`workbench.flatness.activation_quant_prediction`. With
``a_candidates`` the allocation gives each layer an input width too: under an average-activation-
bits budget of its own (``a_budget``, element-weighted) for the bits and bytes kinds, or jointly
with the weight widths for bit-operations, where a layer's cost ``MACs x w x a`` couples the two.
What is left out, and said so: the cross-layer terms of the Hessian (weights with weights,
activations with activations, and weights with activations) and the first-order term (see
notebook 09).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..quant import check_bits

#: What a budget counts: the parameter-weighted average weight bits, the weight bytes, or the
#: bit-operations (multiply-accumulates x weight bits x activation bits) of one image.
BUDGET_KINDS = ("bits", "bytes", "bops")
#: Resource units per DP cell are scaled so that the table has at most this many cells per layer.
MAX_DP_CELLS = 2_000_000


def _levels(bits: int) -> int:
    return 2 ** (int(bits) - 1) - 1  # a symmetric grid's positive levels: the step is max|w| / levels


def _a_levels(bits: int) -> int:
    return 2 ** int(bits) - 1  # an asymmetric per-tensor grid's steps: the step is (hi - lo) / levels


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's price list: its weight count (``kind="weight"``) or input elements per image
    (``kind="activation"``), MACs per image, and the predicted loss increase (with standard error)
    at the reference width, from which every width is priced (the step halves with each bit, on the
    symmetric weight grid or the asymmetric activation grid)."""

    name: str
    params: int
    macs: int
    ref_bits: int
    predicted_ref: float
    stderr_ref: float
    clamped: bool = False  # the estimate was negative (probe noise) and is taken as 0
    kind: str = "weight"  # weight | activation

    def _ratio(self, bits: int) -> float:
        levels = _a_levels if self.kind == "activation" else _levels
        return (levels(self.ref_bits) / levels(bits)) ** 2

    def predicted(self, bits: int) -> float:
        return self.predicted_ref * self._ratio(bits)

    def stderr(self, bits: int) -> float:
        return self.stderr_ref * self._ratio(bits)


@dataclass(frozen=True)
class Allocation:
    """Weight bits per layer (and, with ``a_layer_bits``, input bits per layer) with the predicted
    loss increase of the whole choice."""

    bits: dict[str, int]
    predicted: float
    predicted_stderr: float  # if the layers' errors were independent (they share probes: an approximation)
    average_bits: float  # parameter-weighted
    size_bytes: float
    bops: float
    budget: float
    budget_kind: str
    a_bits: int | None
    method: str
    seconds: float = 0.0
    layers: list[dict[str, Any]] = field(default_factory=list, repr=False)
    a_layer_bits: dict[str, int] = field(default_factory=dict)  # input bits per layer (empty: a_bits everywhere)
    average_a_bits: float | None = None  # element-weighted, with a_layer_bits
    a_budget: float | None = None

    def config(self, **fields: Any) -> Any:
        """A :class:`~workbench.ptq.PTQConfig` that quantizes with these widths (``fields`` add
        the observer, bias correction, ...); ``w_bits`` (and ``a_bits``, which the attention
        matmuls keep) default to the most common width."""
        from .engine import PTQConfig

        def common(m: dict[str, int]) -> int:
            return max(set(m.values()), key=list(m.values()).count)

        extra = {"a_bits": common(self.a_layer_bits), "layer_a_bits": dict(self.a_layer_bits)} if self.a_layer_bits \
            else {"a_bits": self.a_bits}
        return PTQConfig(**{"w_bits": common(self.bits), **extra, **fields, "layer_bits": dict(self.bits)})

    def to_dict(self) -> dict[str, Any]:
        return {"bits": dict(self.bits), "a_layer_bits": dict(self.a_layer_bits), "predicted": self.predicted,
                "predicted_stderr": self.predicted_stderr, "average_bits": self.average_bits,
                "average_a_bits": self.average_a_bits, "size_bytes": self.size_bytes, "bops": self.bops,
                "budget": self.budget, "budget_kind": self.budget_kind, "a_budget": self.a_budget,
                "a_bits": self.a_bits, "method": self.method, "seconds": self.seconds, "layers": list(self.layers)}


# ----------------------------------------------------------------------------- sensitivities


def weight_layers(model: nn.Module) -> list[str]:
    """The Linear/Conv modules PTQ quantizes, in the order the engine visits them."""
    out, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            out.append(name)
            inside.append(name)
    return out


def layer_macs(model: nn.Module, images: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each Linear/Conv layer for one image (from one forward pass)."""
    names = weight_layers(model)
    macs: dict[str, int] = {}
    hooks = []
    for name in names:
        layer = model.get_submodule(name)

        def hook(mod: nn.Module, _inp: Any, out: torch.Tensor, name: str = name) -> None:
            per_output = mod.weight[0].numel()  # inputs each output element sums over
            macs[name] = int(out[0].numel() * per_output)  # out[0]: one image

        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(images[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_sensitivities(model: nn.Module, data: Any, *, ref_bits: int = 4, loss_fn: Callable | None = None,
                        tol: float = 0.05, min_probes: int = 10, max_probes: int = 50, deflate: int = 20,
                        generator: torch.Generator | None = None) -> list[LayerSensitivity]:
    """Each Linear/Conv layer's predicted weight-rounding loss increase at ``ref_bits`` (the
    sigma-weighted diagonal-block trace, halved) with its standard error, on ``data`` (a batch
    ``(x, y)`` or a list of batches)."""
    from ..flatness import LossHessian, hutchinson_trace, quantized_weight_names, weight_sigma

    check_bits(ref_bits, "ref_bits")
    layers = weight_layers(model)
    params = {n: p for n, p in model.named_parameters()}
    weight_of = {f"{n}.weight": n for n in layers if f"{n}.weight" in params}
    names = [n for n in quantized_weight_names(model) if n in weight_of]
    if not names:
        raise ConfigError("the model has no Linear/Conv weights to allocate bits to")
    with LossHessian(model, data, loss_fn=loss_fn, params=names) as H:
        sig = weight_sigma(H.model, H.names, ref_bits)
        tr = hutchinson_trace(H, tol=tol, min_probes=min_probes, max_probes=max_probes, deflate=deflate,
                              scale=sig, per_layer=True, generator=generator)
        first = H.batches[0][0]
    macs = layer_macs(model, first)
    out = []
    for pname in names:
        layer = weight_of[pname]
        est = (tr.per_layer or {}).get(layer, {})  # per-layer traces are keyed by module name
        value, se = float(est.get("estimate", math.nan)) / 2, float(est.get("stderr", math.nan)) / 2
        # a layer of small curvature can get a negative estimate from probe noise; left negative,
        # the solver would give it the fewest bits *because* rounding it looked beneficial
        out.append(LayerSensitivity(layer, params[pname].numel(), macs.get(layer, 0), int(ref_bits),
                                    max(value, 0.0), se, clamped=value < 0))
    return out


def activation_sensitivities(model: nn.Module, data: Any, *, ref_bits: int = 8, loss_fn: Callable | None = None,
                             tol: float = 0.05, min_probes: int = 10, max_probes: int = 50, block: int = 1,
                             generator: torch.Generator | None = None) -> list[LayerSensitivity]:
    """Each Linear/Conv input's predicted rounding loss increase at ``ref_bits`` (per-tensor
    min/max ranges on ``data``, the PTQ default grid) with its standard error: the per-layer split of
    :func:`workbench.flatness.activation_quant_prediction`. ``params`` holds the input's elements
    per image, what an activation width is paid on."""
    from ..flatness import activation_quant_prediction

    check_bits(ref_bits, "ref_bits")
    pred = activation_quant_prediction(model, data, a_bits=ref_bits, tol=tol, min_probes=min_probes,
                                       max_probes=max_probes, block=block, noise_samples=0, loss_fn=loss_fn, measure=False,
                                       per_layer=True, generator=generator)
    layers = weight_layers(model)
    first = data[0] if isinstance(data, (tuple, list)) and isinstance(data[0], torch.Tensor) else data[0][0]
    macs = layer_macs(model, first)
    out = []
    for name in layers:
        est = (pred.per_layer or {}).get(name)
        if est is None or name not in (pred.elements or {}):
            continue  # a layer the forward pass never reached
        value, se = est["estimate"] / 2, est["stderr"] / 2
        out.append(LayerSensitivity(name, int(pred.elements[name]), macs.get(name, 0), int(ref_bits), max(value, 0.0),
                                    se, clamped=value < 0, kind="activation"))
    return out


# ----------------------------------------------------------------------------- the exact solver


def _resource(s: LayerSensitivity, bits: int, kind: str, a_bits: int | None) -> int:
    if kind == "bops":
        return int(s.macs) * int(bits) * int(a_bits or 32)
    return int(s.params) * int(bits)  # bits and bytes: the same resource in other units


def _limit(budget: float, kind: str, sens: Sequence[LayerSensitivity]) -> float:
    if kind == "bits":
        return budget * sum(s.params for s in sens)
    if kind == "bytes":
        return budget * 8
    return budget


def solve(costs: Sequence[Mapping[Any, float]], resources: Sequence[Mapping[Any, int]], limit: float
          ) -> tuple[list[Any], float]:
    """Exact multiple-choice knapsack: one option per layer (``costs[l][option]``; an option is any
    hashable, a width or a ``(w, a)`` pair) minimizing the
    total cost with ``sum resources[l][option] <= limit``. Resources are divided by their common
    divisor first (and, only if the table would still be too large, coarsened upwards, so that
    the budget is never exceeded; the result then stays feasible and is optimal for the
    coarsened resources).

    Returns ``(options, total cost)``.

    Raises:
        ConfigError: no choice fits the limit.
    """
    if not costs:
        raise ConfigError("no layers to allocate")
    minimum = sum(min(r.values()) for r in resources)
    if minimum > limit:
        raise ConfigError(f"the budget is below the smallest possible choice ({minimum} > {limit:g} resource "
                          "units): raise the budget or add smaller bit widths to the candidates")
    g = reduce(math.gcd, (int(v) for r in resources for v in r.values()))
    unit = max(g, 1)
    cells = int(limit // unit)
    if cells > MAX_DP_CELLS:  # coarsen: round every resource up, so feasibility is kept
        unit = math.ceil(limit / MAX_DP_CELLS)
        cells = int(limit // unit)
    INF = math.inf
    dp = np.full(cells + 1, INF)
    dp[0] = 0.0
    choice = []
    keys = [list(cost) for cost in costs]
    for cost, res, options in zip(costs, resources, keys):
        new = np.full(cells + 1, INF)
        pick = np.full(cells + 1, -1, dtype=np.int64)
        for index, option in enumerate(options):
            w = math.ceil(res[option] / unit)
            if w > cells:
                continue
            cand = np.full(cells + 1, INF)
            cand[w:] = dp[: cells + 1 - w] + cost[option]
            better = cand < new
            new[better] = cand[better]
            pick[better] = index
        dp = new
        choice.append(pick)
    end = int(np.argmin(dp))
    if not math.isfinite(dp[end]):
        raise ConfigError("no allocation fits the budget after rounding resources up; raise the budget slightly")
    total = float(dp[end])
    options = []
    r = end
    for res, pick, opts in zip(reversed(resources), reversed(choice), reversed(keys)):
        option = opts[int(pick[r])]
        options.append(option)
        r -= math.ceil(res[option] / unit)
    options.reverse()
    return options, total


# ----------------------------------------------------------------------------- allocations


def _allocation(sens: Sequence[LayerSensitivity], bits: Sequence[int], *, budget: float, kind: str,
                a_bits: int | None, method: str, seconds: float = 0.0,
                a_sens: Sequence[LayerSensitivity] = (), a_choice: Sequence[int] = (),
                a_budget: float | None = None) -> Allocation:
    n = sum(s.params for s in sens)
    a_of = {s.name: (s, int(b)) for s, b in zip(a_sens, a_choice)}
    layers = []
    for s, b in zip(sens, bits):
        row = {"layer": s.name, "params": s.params, "bits": int(b), "predicted": s.predicted(b),
               "predicted_stderr": s.stderr(b)}
        if s.name in a_of:
            sa, ba = a_of[s.name]
            row.update(a_elements=sa.params, a_bits=ba, a_predicted=sa.predicted(ba), a_predicted_stderr=sa.stderr(ba))
        layers.append(row)
    predicted = sum(r["predicted"] + r.get("a_predicted", 0.0) for r in layers)
    stderr = math.sqrt(sum(r["predicted_stderr"] ** 2 + r.get("a_predicted_stderr", 0.0) ** 2 for r in layers))
    bops = float(sum(s.macs * b * (a_of[s.name][1] if s.name in a_of else (a_bits or 32)) for s, b in zip(sens, bits)))
    elements = sum(sa.params for sa, _ in a_of.values())
    return Allocation({s.name: int(b) for s, b in zip(sens, bits)}, predicted, stderr,
                      sum(s.params * b for s, b in zip(sens, bits)) / n, sum(s.params * b for s, b in zip(sens, bits)) / 8,
                      bops, float(budget), kind, a_bits, method, seconds, layers,
                      {name: b for name, (_, b) in a_of.items()},
                      sum(sa.params * b for sa, b in a_of.values()) / elements if elements else None, a_budget)


def _check(budget: float, kind: str, candidates: Sequence[int], what: str = "weight") -> list[int]:
    if kind not in BUDGET_KINDS:
        raise ConfigError(f"budget_kind must be one of {BUDGET_KINDS}, got {kind!r}")
    cands = sorted({check_bits(b, "candidate bits") for b in candidates})
    if not cands:
        raise ConfigError("give at least one candidate bit width")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ConfigError(f"the budget must be a positive number, got {budget!r}")
    if kind == "bits" and budget < cands[0]:
        raise ConfigError(f"an average of {budget:g} {what} bits is impossible with candidates {cands}: the "
                          f"fewest is {cands[0]} bits per {what} everywhere")
    return cands


def allocate_bits(model: nn.Module, data: Any = None, budget: float = 4.0, *,
                  candidates: Iterable[int] = (8, 6, 4, 3, 2), budget_kind: str = "bits", a_bits: int | None = None,
                  a_candidates: Iterable[int] | None = None, a_budget: float | None = None,
                  sensitivities: Sequence[LayerSensitivity] | None = None,
                  a_sensitivities: Sequence[LayerSensitivity] | None = None, **sensitivity_kwargs: Any) -> Allocation:
    """The weight widths per layer (and with ``a_candidates`` the input widths per layer) that
    minimize the predicted loss increase under ``budget``.

    Args:
        data: a batch ``(x, y)`` or a list of them, for the curvature (not needed when
            ``sensitivities`` are given, e.g. to try several budgets at the cost of one estimate).
        budget: average weight bits (``budget_kind="bits"``), weight bytes (``"bytes"``) or
            bit-operations per image (``"bops"``, with ``a_bits``).
        candidates: the widths each layer may take.
        a_candidates: the input widths each layer may take; None keeps ``a_bits`` everywhere.
        a_budget: with ``a_candidates`` and a bits or bytes budget: the average input bits
            (weighted by each input's elements per image). A bops budget prices both together.
        sensitivity_kwargs: passed to :func:`layer_sensitivities` (``ref_bits``, ``max_probes``, ...).

    Raises:
        ConfigError: an impossible budget (e.g. below 2 bits on average with 2 the fewest
            candidate), an unknown budget kind, bops without ``a_bits`` or ``a_candidates``, or
            ``a_candidates`` without the budget that prices them.
    """
    cands = _check(budget, budget_kind, candidates)
    a_cands = sorted({check_bits(b, "activation candidate bits") for b in a_candidates}) if a_candidates else []
    if a_candidates is not None and not a_cands:
        raise ConfigError("give at least one activation candidate bit width")
    if budget_kind == "bops" and a_bits is None and not a_cands:
        raise ConfigError("a bops budget needs a_bits (the activation width of every layer) or a_candidates")
    if a_cands and budget_kind != "bops":
        if a_budget is None:
            raise ConfigError("per-layer activation widths need their own budget: give a_budget (average input "
                              "bits), or use budget_kind='bops', which prices weights and activations together")
        _check(a_budget, "bits", a_cands, what="input")
    elif a_budget is not None:
        raise ConfigError("a_budget prices per-layer activation widths: give a_candidates too"
                          + (" (a bops budget already covers activations)" if budget_kind == "bops" else ""))
    t0 = time.perf_counter()
    sens = list(sensitivities) if sensitivities is not None else layer_sensitivities(model, data,
                                                                                     **sensitivity_kwargs)
    a_sens: list[LayerSensitivity] = []
    if a_cands:
        a_sens = list(a_sensitivities) if a_sensitivities is not None else activation_sensitivities(model, data)
        missing = sorted({s.name for s in sens} - {s.name for s in a_sens})
        if missing:
            raise ConfigError(f"no activation sensitivity for {missing[:3]}: price every layer's input")
        a_by = {s.name: s for s in a_sens}
        a_sens = [a_by[s.name] for s in sens]
    if a_cands and budget_kind == "bops":  # one option per layer: a (weight, input) pair
        pairs = [(w, a) for w in cands for a in a_cands]
        costs = [{(w, a): s.predicted(w) + sa.predicted(a) for w, a in pairs} for s, sa in zip(sens, a_sens)]
        res = [{(w, a): int(s.macs) * w * a for w, a in pairs} for s in sens]
        chosen, _ = solve(costs, res, _limit(budget, budget_kind, sens))
        bits, a_choice = [w for w, _ in chosen], [a for _, a in chosen]
    else:
        costs = [{b: s.predicted(b) for b in cands} for s in sens]
        res = [{b: _resource(s, b, budget_kind, a_bits) for b in cands} for s in sens]
        bits, _ = solve(costs, res, _limit(budget, budget_kind, sens))
        a_choice = []
        if a_cands:
            a_costs = [{b: s.predicted(b) for b in a_cands} for s in a_sens]
            a_res = [{b: int(s.params) * b for b in a_cands} for s in a_sens]
            a_choice, _ = solve(a_costs, a_res, float(a_budget) * sum(s.params for s in a_sens))
    return _allocation(sens, bits, budget=budget, kind=budget_kind, a_bits=a_bits, method="curvature",
                       seconds=time.perf_counter() - t0, a_sens=a_sens, a_choice=a_choice, a_budget=a_budget)


def uniform_allocation(sens: Sequence[LayerSensitivity], bits: int, *, a_bits: int | None = None) -> Allocation:
    """Every layer at ``bits``: the baseline at the same average."""
    return _allocation(sens, [bits] * len(sens), budget=bits, kind="bits", a_bits=a_bits, method="uniform")


def random_allocation(sens: Sequence[LayerSensitivity], budget: float, *, candidates: Iterable[int] = (8, 6, 4, 3, 2),
                      a_bits: int | None = None, generator: np.random.Generator | None = None) -> Allocation:
    """A random allocation within the average-bits budget: random costs through the same exact
    solver, so it uses the budget as fully as the curvature one but ignores curvature."""
    cands = _check(budget, "bits", candidates)
    rng = generator or np.random.default_rng(0)
    costs = [{b: float(rng.random()) * (_levels(cands[-1]) / _levels(b)) ** 2 for b in cands} for _ in sens]
    res = [{b: _resource(s, b, "bits", a_bits) for b in cands} for s in sens]
    bits, _ = solve(costs, res, _limit(budget, "bits", sens))
    return _allocation(sens, bits, budget=budget, kind="bits", a_bits=a_bits, method="random")


def proxy_allocation(model: nn.Module, sens: Sequence[LayerSensitivity], budget: float, *,
                     candidates: Iterable[int] = (8, 6, 4, 3, 2), a_bits: int | None = None) -> Allocation:
    """The cheaper proxy without curvature: each layer's rounding-error energy ``sum sigma_i(b)^2``
    (its weights' quantization error norm), through the same exact solver."""
    cands = _check(budget, "bits", candidates)
    from .. import quant

    named = dict(model.named_modules())
    costs = []
    for s in sens:
        w = named[s.name].weight.detach()
        energy = {b: float(quant.weight_qparams(w, b).noise_std.pow(2).expand_as(w).sum()) for b in cands}
        costs.append(energy)
    res = [{b: _resource(s, b, "bits", a_bits) for b in cands} for s in sens]
    bits, _ = solve(costs, res, _limit(budget, "bits", sens))
    return _allocation(sens, bits, budget=budget, kind="bits", a_bits=a_bits, method="proxy (error norm)")
