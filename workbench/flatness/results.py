"""The result records of the flatness estimators (plain dataclasses, JSON-able with ``to_dict``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Result:
    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-able) dict."""
        return asdict(self)


@dataclass(frozen=True)
class EigenResult(Result):
    """Top-k Hessian eigenvalues (largest first)."""

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]  # ||H u - lambda u|| per eigenpair (Lanczos: Ritz residual bound)
    iterations: int
    hvps: int
    converged: bool
    tol: float
    algorithm: str
    method: str
    seconds: float
    eigenvectors: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "eigenvectors"}
        return d


@dataclass(frozen=True)
class TraceResult(Result):
    """Trace estimate: the exactly known deflated part plus the Hutchinson mean of the rest, with its standard error."""

    estimate: float
    stderr: float
    probes: int
    converged: bool
    tol: float
    method: str
    seconds: float
    samples: tuple[float, ...] = field(repr=False)  # of the estimated (non-deflated) part
    per_layer: dict[str, dict[str, float]] | None = field(default=None, repr=False)
    deflated: int = 0  # Lanczos steps whose subspace was taken exactly
    deflated_part: float = 0.0  # the exact part of the estimate (sum of the Lanczos coefficients)
    hvps: int = 0  # Hessian-vector products in all (deflation + probes)

    @property
    def rel_stderr(self) -> float:
        return self.stderr / abs(self.estimate) if self.estimate else math.inf


@dataclass(frozen=True)
class DensityResult(Result):
    """Spectral density by stochastic Lanczos quadrature (Gaussian-broadened)."""

    grid: tuple[float, ...]
    density: tuple[float, ...]
    nodes: tuple[tuple[float, ...], ...]  # Ritz values per run
    weights: tuple[tuple[float, ...], ...]  # quadrature weights per run (sum to 1)
    runs: int
    lanczos_steps: int
    sigma: float
    hvps: int
    seconds: float


@dataclass(frozen=True)
class QuantPrediction(Result):
    """Second-order prediction of the weight-quantization loss increase vs what PTQ does.

    ``predicted = 1/2 sum_i sigma_i^2 H_ii`` with sigma the rounding-noise std (step/sqrt(12)) of
    per-channel symmetric round-to-nearest at ``w_bits``; ``measured_rtn`` is the actual loss increase
    of that quantizer (on a functional copy); ``measured_noise`` the mean increase under uniform noise
    of the same variance (what the noise model assumes), with its standard error.
    """

    w_bits: int
    sigma_trace: float
    sigma_trace_stderr: float
    predicted: float
    predicted_stderr: float
    measured_rtn: float
    measured_noise: float
    measured_noise_stderr: float
    clean_loss: float
    quant_loss: float
    clean_accuracy: float  # top-1, percent
    quant_accuracy: float  # top-1, percent
    first_order: float  # g . (Q(w) - w): the linear term the second-order prediction ignores
    probes: int
    converged: bool
    params: int
    seconds: float


@dataclass(frozen=True)
class SharpnessResult(Result):
    """Loss increase under a weight perturbation: worst case in an eps-ball or mean under noise."""

    kind: str  # "ascent" | "gaussian"
    radius: float  # eps (ascent) or sigma (gaussian)
    increase: float
    stderr: float  # 0 for ascent
    base_loss: float
    steps: int  # ascent steps or noise samples
    relative: bool
    seconds: float


@dataclass(frozen=True)
class ActQuantPrediction(Result):
    """Second-order prediction of the activation-quantization loss increase vs measured.

    ``sigma_trace = sum sigma_l^2 H_xx`` over every element of every quantized layer input (Linear/Conv
    inputs, per-tensor asymmetric min/max ranges observed on the same data), by Hutchinson on the
    Hessian w.r.t. zero perturbations added to those inputs.
    """

    a_bits: int
    sigma_trace: float
    sigma_trace_stderr: float
    predicted: float
    predicted_stderr: float
    measured_rtn: float
    measured_noise: float
    measured_noise_stderr: float
    clean_loss: float
    quant_loss: float
    clean_accuracy: float  # top-1, percent
    quant_accuracy: float  # top-1, percent
    probes: int
    converged: bool
    layers: int
    seconds: float
    #: with ``per_layer``: each Linear/Conv input's own ``{"estimate", "stderr"}`` of
    #: ``sum sigma_l^2 H_xx`` over that input alone (its diagonal block; the same probes)
    per_layer: dict[str, dict[str, float]] | None = field(default=None, repr=False)
    #: with ``per_layer``: each input's elements per image (what an activation width is paid on)
    elements: dict[str, int] | None = field(default=None, repr=False)
