"""Everything at once: the flatness report of one model and the damage table over several."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..stats import MIN_RANK_POINTS, spearman
from .hessian import Batch, LossFn, LossHessian, as_batches
from .prediction import activation_quant_prediction, weight_quant_predictions
from .sharpness import sharpness_ascent, sharpness_gaussian
from .spectrum import density_trace, spectral_density, top_eigenvalues
from .trace import hutchinson_trace


def flatness_report(model: nn.Module, data: Batch | Iterable[Batch], *, w_bits: int | Sequence[int] = (4, 3),
                    a_bits: int | Sequence[int] | None = None,
                    trace: bool = True, eig: int = 1, density: bool = False, sharpness: bool = True,
                    per_layer: bool = False, trace_tol: float = 0.05, max_probes: int = 30, trace_deflate: int = 20,
                    eig_tol: float = 1e-3, eig_max_iter: int = 50, sharpness_eps: float = 0.05,
                    noise_sigma: float = 0.01, loss_fn: LossFn | None = None,
                    device: str | torch.device | None = None, seed: int = 0, compile: bool = False,  # noqa: A002
                    progress: bool = False) -> dict[str, Any]:
    """All flatness measures of one model on fixed data, as a plain JSON-able dict.

    Keys: ``loss``, ``accuracy``, ``params``, ``hvp_method``, ``top_eigenvalues`` (if ``eig``),
    ``trace`` (if ``trace``), ``density`` (if ``density``), ``sharpness`` (ascent and gaussian) and
    ``quant`` (one entry per ``w_bits``: sigma-weighted trace, predicted vs measured loss increase) and
    ``quant_act`` (one entry per ``a_bits``, if given: the same for Linear/Conv inputs).
    ``compile`` applies to the full-parameter Hessian (eigenvalues, trace, density); see :class:`LossHessian`.
    ``trace_deflate`` Lanczos steps are taken exactly before the probes of every trace (0: plain Hutchinson).
    """
    bits = [w_bits] if isinstance(w_bits, int) else list(w_bits)
    gen = torch.Generator().manual_seed(seed)
    probes = {"min_probes": min(10, max_probes), "max_probes": max_probes}
    deflate = {"deflate": trace_deflate}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with LossHessian(model, data, loss_fn=loss_fn, device=device, compile=compile) as H:
        loss, acc = H.loss(accuracy=True)  # type: ignore[misc]
        out.update(loss=loss, accuracy=acc, params=H.numel, batches=len(H.batches),
                   samples=sum(x.shape[0] for x, _ in H.batches))
        if eig:
            out["top_eigenvalues"] = top_eigenvalues(H, k=eig, tol=eig_tol, max_iter=eig_max_iter,
                                                     generator=gen).to_dict()
        if trace:
            out["trace"] = hutchinson_trace(H, tol=trace_tol, **probes, **deflate, per_layer=per_layer,
                                            generator=gen, progress=progress).to_dict()
            out["trace"].pop("samples", None)
        if density:
            d = spectral_density(H, generator=gen)
            out["density"] = d.to_dict() | {"trace": density_trace(d, H.numel)}
        if sharpness:
            out["sharpness"] = {
                "ascent": sharpness_ascent(H, eps=sharpness_eps).to_dict(),
                "gaussian": sharpness_gaussian(H, sigma=noise_sigma, generator=gen).to_dict(),
            }
        out["hvp_method"] = H.method_used
        H_data = H.batches
    # one Hessian of the quantized weights for every width: the sigma-weighted trace is estimated
    # once and scaled (see weight_quant_predictions)
    preds = weight_quant_predictions(model, H_data, w_bits=bits, tol=trace_tol, **probes, **deflate,
                                     generator=gen, loss_fn=loss_fn, device=device)
    out["quant"] = {f"W{p.w_bits}": p.to_dict() for p in preds}
    if a_bits is not None:
        abits = [a_bits] if isinstance(a_bits, int) else list(a_bits)
        out["quant_act"] = {f"A{b}": activation_quant_prediction(model, H_data, a_bits=b, tol=trace_tol, **probes,
                                                                 generator=gen,
                                                                 loss_fn=loss_fn, device=device).to_dict()
                            for b in abits}
    out["seconds"] = time.perf_counter() - t0
    return out


#: Flatness measures compared against the measured PTQ damage, as (column, getter on a report).
MEASURES: dict[str, Callable[[dict[str, Any], str], float]] = {
    "top_eigenvalue": lambda r, b: r.get("top_eigenvalues", {}).get("eigenvalues", [math.nan])[0],
    "trace": lambda r, b: r.get("trace", {}).get("estimate", math.nan),
    "sigma_trace": lambda r, b: r["quant"][b]["sigma_trace"],
    "predicted_increase": lambda r, b: r["quant"][b]["predicted"],
    "sharpness_ascent": lambda r, b: r.get("sharpness", {}).get("ascent", {}).get("increase", math.nan),
    "sharpness_gaussian": lambda r, b: r.get("sharpness", {}).get("gaussian", {}).get("increase", math.nan),
}


#: Fewest models a rank correlation is computed over (:data:`workbench.stats.MIN_RANK_POINTS`).
MIN_RANK_MODELS = MIN_RANK_POINTS


def damage_table(models: Mapping[str, nn.Module], data: Batch | Iterable[Batch], *,
                 w_bits: int | Sequence[int] = (4, 3), **report_kwargs: Any) -> dict[str, Any]:
    """Which flatness measure predicts PTQ damage? One report per model, a tidy table and rank correlations.

    Returns ``{"rows": [...], "spearman": {w_bits: {measure: rho_vs_loss_increase, ...}},
    "spearman_acc": {...}, "spearman_note": str, "reports": {name: report}}``. Each row: model,
    w_bits, every measure in :data:`MEASURES`, ``measured_increase`` (RTN loss increase) and
    ``acc_drop`` (accuracy points lost to RTN weights). Below :data:`MIN_RANK_MODELS` models the correlations are left empty and
    ``spearman_note`` says why.
    """
    bits = [w_bits] if isinstance(w_bits, int) else list(w_bits)
    batches = as_batches(data)
    reports = {name: flatness_report(m, batches, w_bits=bits, **report_kwargs) for name, m in models.items()}
    rows = []
    for name, r in reports.items():
        for b in bits:
            key = f"W{b}"
            q = r["quant"][key]
            row = {"model": name, "w_bits": b}
            row.update({m: float(f(r, key)) for m, f in MEASURES.items()})
            row.update(measured_increase=q["measured_rtn"], acc_drop=q["clean_accuracy"] - q["quant_accuracy"],
                       first_order=q["first_order"])
            rows.append(row)
    rho: dict[str, dict[str, float]] = {}
    rho_acc: dict[str, dict[str, float]] = {}
    if len(models) < MIN_RANK_MODELS:
        note = (f"{len(models)} model(s): no rank correlation is computed below {MIN_RANK_MODELS} models "
                "(over 2 models Spearman's rho is +-1 whatever the measures are)")
        return {"rows": rows, "spearman": rho, "spearman_acc": rho_acc, "spearman_note": note, "reports": reports}
    for b in bits:
        sub = [r for r in rows if r["w_bits"] == b]
        rho[f"W{b}"] = {m: spearman([r[m] for r in sub], [r["measured_increase"] for r in sub]) for m in MEASURES}
        rho_acc[f"W{b}"] = {m: spearman([r[m] for r in sub], [r["acc_drop"] for r in sub]) for m in MEASURES}
    return {"rows": rows, "spearman": rho, "spearman_acc": rho_acc,
            "spearman_note": f"over {len(models)} models", "reports": reports}
