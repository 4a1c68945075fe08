"""Sharpness: the worst-case (ascent) and the average (Gaussian) loss increase within a radius."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .hessian import Batch, LossFn, LossHessian, hessian_of
from .probes import mean_se, randn
from .results import SharpnessResult


def sharpness_ascent(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                     eps: float = 0.05, steps: int = 5, relative: bool = False,
                     loss_fn: LossFn | None = None, params: str | Sequence[str] | None = None,
                     device: str | torch.device | None = None) -> SharpnessResult:
    """Largest loss increase found in the ball ``||delta|| <= eps`` by projected gradient ascent.

    The first step is SAM's (``eps * g / ||g||``); later steps move ``eps/2`` along the normalized
    gradient and project back onto the ball. With ``relative`` the ball is ASAM's: ``||delta / |w| || <= eps``
    (the perturbation is scaled elementwise by ``|w|``). A lower bound on the true maximum.
    """
    if eps <= 0 or steps < 1:
        raise ConfigError(f"need eps > 0 and steps >= 1, got {eps}, {steps}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device}
    with hessian_of(target, data, opts) as H:
        t0 = time.perf_counter()
        base = float(H.loss())
        w = H.param_vector()
        t = w.abs() if relative else torch.ones_like(w)  # delta = t * u with ||u|| <= eps
        u = torch.zeros_like(w)
        best = 0.0
        for i in range(steps):
            d = H.unflatten(t * u)
            p = {n: H.param(n) + d[n] for n in H.names}
            gu = H.gradient(p) * t  # chain rule: d loss / d u
            gn = gu.norm()
            if gn == 0:
                break
            u = u + (eps if i == 0 else eps / 2) * gu / gn
            un = u.norm()
            if un > eps:
                u = u * (eps / un)
            best = max(best, H.perturbed_loss(t * u) - base)
        return SharpnessResult("ascent", eps, best, 0.0, base, steps, relative, time.perf_counter() - t0)


def sharpness_gaussian(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                       sigma: float | torch.Tensor = 0.01, samples: int = 10, relative: bool = False,
                       generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                       params: str | Sequence[str] | None = None,
                       device: str | torch.device | None = None) -> SharpnessResult:
    """Mean loss increase under Gaussian weight noise ``N(0, sigma^2)`` (elementwise ``sigma |w|`` if relative).

    ``sigma`` may be a flat per-parameter vector (e.g. :func:`weight_sigma`). By the expected value
    identity the result is about ``1/2 sum sigma_i^2 H_ii`` for small sigma.
    """
    if samples < 2:
        raise ConfigError(f"samples must be >= 2 (for a standard error), got {samples}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device}
    with hessian_of(target, data, opts) as H:
        t0 = time.perf_counter()
        base = float(H.loss())
        w = H.param_vector()
        s = sigma.to(H.device) if isinstance(sigma, torch.Tensor) else torch.full_like(w, float(sigma))
        if relative:
            s = s * w.abs()
        incs = [H.perturbed_loss(randn(H.numel, generator, H.device, H.dtype) * s) - base for _ in range(samples)]
        mean, se = mean_se(incs)
        radius = float(sigma) if not isinstance(sigma, torch.Tensor) else float(sigma.pow(2).mean().sqrt())
        return SharpnessResult("gaussian", radius, mean, se, base, samples, relative, time.perf_counter() - t0)
