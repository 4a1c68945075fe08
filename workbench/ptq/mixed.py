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
What is left out, and said so: the cross-layer terms of the Hessian and the first-order term
(see notebook 09), and activations, which keep one width for the whole model.
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


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's price list: its weight count, MACs per image, and the predicted loss increase
    (with standard error) at the reference width, from which every width is priced."""

    name: str
    params: int
    macs: int
    ref_bits: int
    predicted_ref: float
    stderr_ref: float
    clamped: bool = False  # the estimate was negative (probe noise) and is taken as 0

    def predicted(self, bits: int) -> float:
        return self.predicted_ref * (_levels(self.ref_bits) / _levels(bits)) ** 2

    def stderr(self, bits: int) -> float:
        return self.stderr_ref * (_levels(self.ref_bits) / _levels(bits)) ** 2


@dataclass(frozen=True)
class Allocation:
    """Weight bits per layer with the predicted loss increase of the whole choice."""

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

    def config(self, **fields: Any) -> Any:
        """A :class:`~workbench.ptq.PTQConfig` that quantizes with these widths (``fields`` add
        the observer, bias correction, ...); ``w_bits`` defaults to the most common width."""
        from .engine import PTQConfig

        common = max(set(self.bits.values()), key=list(self.bits.values()).count)
        return PTQConfig(**{"w_bits": common, "a_bits": self.a_bits, **fields, "layer_bits": dict(self.bits)})

    def to_dict(self) -> dict[str, Any]:
        return {"bits": dict(self.bits), "predicted": self.predicted, "predicted_stderr": self.predicted_stderr,
                "average_bits": self.average_bits, "size_bytes": self.size_bytes, "bops": self.bops,
                "budget": self.budget, "budget_kind": self.budget_kind, "a_bits": self.a_bits, "method": self.method,
                "seconds": self.seconds, "layers": list(self.layers)}


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


def solve(costs: Sequence[Mapping[int, float]], resources: Sequence[Mapping[int, int]], limit: float
          ) -> tuple[list[int], float]:
    """Exact multiple-choice knapsack: one option per layer (``costs[l][option]``) minimizing the
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
    for cost, res in zip(costs, resources):
        new = np.full(cells + 1, INF)
        pick = np.full(cells + 1, -1, dtype=np.int64)
        for option, c in cost.items():
            w = math.ceil(res[option] / unit)
            if w > cells:
                continue
            cand = np.full(cells + 1, INF)
            cand[w:] = dp[: cells + 1 - w] + c
            better = cand < new
            new[better] = cand[better]
            pick[better] = option
        dp = new
        choice.append(pick)
    end = int(np.argmin(dp))
    if not math.isfinite(dp[end]):
        raise ConfigError("no allocation fits the budget after rounding resources up; raise the budget slightly")
    total = float(dp[end])
    options = []
    r = end
    for res, pick in zip(reversed(resources), reversed(choice)):
        option = int(pick[r])
        options.append(option)
        r -= math.ceil(res[option] / unit)
    options.reverse()
    return options, total


# ----------------------------------------------------------------------------- allocations


def _allocation(sens: Sequence[LayerSensitivity], bits: Sequence[int], *, budget: float, kind: str,
                a_bits: int | None, method: str, seconds: float = 0.0) -> Allocation:
    n = sum(s.params for s in sens)
    layers = [{"layer": s.name, "params": s.params, "bits": int(b), "predicted": s.predicted(b),
               "predicted_stderr": s.stderr(b)} for s, b in zip(sens, bits)]
    return Allocation({s.name: int(b) for s, b in zip(sens, bits)}, sum(r["predicted"] for r in layers),
                      math.sqrt(sum(r["predicted_stderr"] ** 2 for r in layers)),
                      sum(s.params * b for s, b in zip(sens, bits)) / n, sum(s.params * b for s, b in zip(sens, bits)) / 8,
                      float(sum(s.macs * b * (a_bits or 32) for s, b in zip(sens, bits))), float(budget), kind,
                      a_bits, method, seconds, layers)


def _check(budget: float, kind: str, candidates: Sequence[int]) -> list[int]:
    if kind not in BUDGET_KINDS:
        raise ConfigError(f"budget_kind must be one of {BUDGET_KINDS}, got {kind!r}")
    cands = sorted({check_bits(b, "candidate bits") for b in candidates})
    if not cands:
        raise ConfigError("give at least one candidate bit width")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ConfigError(f"the budget must be a positive number, got {budget!r}")
    if kind == "bits" and budget < cands[0]:
        raise ConfigError(f"an average of {budget:g} weight bits is impossible with candidates {cands}: the "
                          f"fewest is {cands[0]} bits per weight everywhere")
    return cands


def allocate_bits(model: nn.Module, data: Any = None, budget: float = 4.0, *,
                  candidates: Iterable[int] = (8, 6, 4, 3, 2), budget_kind: str = "bits", a_bits: int | None = None,
                  sensitivities: Sequence[LayerSensitivity] | None = None, **sensitivity_kwargs: Any) -> Allocation:
    """The weight widths per layer that minimize the predicted loss increase under ``budget``.

    Args:
        data: a batch ``(x, y)`` or a list of them, for the curvature (not needed when
            ``sensitivities`` are given, e.g. to try several budgets at the cost of one estimate).
        budget: average weight bits (``budget_kind="bits"``), weight bytes (``"bytes"``) or
            bit-operations per image (``"bops"``, with ``a_bits``).
        candidates: the widths each layer may take.
        sensitivity_kwargs: passed to :func:`layer_sensitivities` (``ref_bits``, ``max_probes``, ...).

    Raises:
        ConfigError: an impossible budget (e.g. below 2 bits on average with 2 the fewest
            candidate), an unknown budget kind, or bops without ``a_bits``.
    """
    cands = _check(budget, budget_kind, candidates)
    if budget_kind == "bops" and a_bits is None:
        raise ConfigError("a bops budget needs a_bits (the activation width of every layer)")
    t0 = time.perf_counter()
    sens = list(sensitivities) if sensitivities is not None else layer_sensitivities(model, data,
                                                                                     **sensitivity_kwargs)
    costs = [{b: s.predicted(b) for b in cands} for s in sens]
    res = [{b: _resource(s, b, budget_kind, a_bits) for b in cands} for s in sens]
    bits, _ = solve(costs, res, _limit(budget, budget_kind, sens))
    return _allocation(sens, bits, budget=budget, kind=budget_kind, a_bits=a_bits, method="curvature",
                       seconds=time.perf_counter() - t0)


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
