"""Flatness analysis: Hessian-vector products, spectrum, trace, sharpness, and PTQ damage predicted
from curvature before quantizing.

A small, PyHessian-like API that stays close to the maths::

    import workbench.flatness as fl
    with fl.LossHessian(model, (x, y)) as H:        # cheap; nothing is computed yet
        eig = fl.top_eigenvalues(H, k=3)             # Lanczos, with a tolerance
        tr = fl.hutchinson_trace(H, tol=0.05)        # estimate +- standard error
        pred = fl.weight_quant_prediction(H, w_bits=4)  # 1/2 sum sigma_i^2 H_ii vs measured PTQ
    fl.flatness_report(model, (x, y), w_bits=(4, 3))   # everything as a plain dict (CLI --json)

Every function also accepts ``(model, data, ...)`` instead of a :class:`LossHessian`.

Honesty rules followed here:

* The model is never changed: all evaluations go through ``torch.func.functional_call`` with
  detached copies (or views) of the parameters, so parameters and buffers stay bitwise equal;
  train/eval flags of every submodule are restored afterwards.
* The Hessian is that of the model in **eval mode** (dropout off, BatchNorm using its running
  statistics). In train mode BatchNorm would make the loss depend on the batch composition and
  update running statistics as a side effect; PyHessian users call ``model.eval()`` for the same
  reason.
* Stochastic estimates come with their standard error, the number of Hessian-vector products used
  and whether the tolerance was met.
* Fused attention (``F.scaled_dot_product_attention``) has no double backward on CPU: timm
  ``Attention`` modules get ``fused_attn = False`` only while a Hessian-vector product runs.

Data-parallel (several processes, see :mod:`workbench.distributed`): with a process group of two or
more, every rank builds a :class:`LossHessian` over its *own* batches and runs the same analysis
with the same random generator; Hessian-vector products, gradients and losses are summed over the
ranks with sample weights, so every rank gets the Hessian of the loss over the union of the data
(and the same estimates). Each product checks that all ranks multiply the same vector.
"""

from __future__ import annotations

from ..runinfo import progress_bar
from ..stats import MIN_RANK_POINTS, spearman
from .hessian import (
    HVP_METHODS,
    QUANT_LAYERS,
    Batch,
    LossFn,
    LossHessian,
    as_batches,
    hessian_of,
    model_device,
    preserved_mode,
    quantized_weight_names,
    select_params,
    unfused_attention,
)
from .prediction import (
    activation_quant_prediction,
    weight_quant_prediction,
    weight_quant_predictions,
    weight_sigma,
)
from .probes import mean_se, rademacher, randn
from .report import MEASURES, MIN_RANK_MODELS, damage_table, flatness_report
from .results import (
    ActQuantPrediction,
    DensityResult,
    EigenResult,
    QuantPrediction,
    Result,
    SharpnessResult,
    TraceResult,
)
from .sharpness import sharpness_ascent, sharpness_gaussian
from .spectrum import density_trace, lanczos, ritz_values, spectral_density, top_eigenvalues
from .trace import hutchinson_trace

__all__ = ["ActQuantPrediction", "Batch", "DensityResult", "EigenResult", "HVP_METHODS", "LossFn", "LossHessian", "MEASURES", "MIN_RANK_MODELS", "QUANT_LAYERS", "QuantPrediction", "Result", "SharpnessResult", "TraceResult", "activation_quant_prediction", "as_batches", "damage_table", "density_trace", "flatness_report", "hessian_of", "hutchinson_trace", "lanczos", "mean_se", "model_device", "preserved_mode", "progress_bar", "quantized_weight_names", "rademacher", "randn", "ritz_values", "select_params", "sharpness_ascent", "sharpness_gaussian", "spectral_density", "top_eigenvalues", "unfused_attention", "weight_quant_prediction", "weight_quant_predictions", "weight_sigma", "MIN_RANK_POINTS", "spearman"]
