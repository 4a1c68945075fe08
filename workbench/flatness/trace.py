"""The Hessian trace by Hutchinson's estimator, with Lanczos deflation and per-layer blocks."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..runinfo import progress_bar
from .hessian import Batch, LossFn, LossHessian, hessian_of
from .probes import mean_se, rademacher, randn
from .results import TraceResult
from .spectrum import lanczos


def hutchinson_trace(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                     tol: float = 0.05, min_probes: int = 10, max_probes: int = 100, deflate: int = 20,
                     per_layer: bool = False, scale: torch.Tensor | None = None, block: int = 1,
                     generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                     params: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                     method: str | None = None, progress: bool = False) -> TraceResult:
    """Estimate ``tr(H)`` (or ``sum_i s_i^2 H_ii`` with ``scale=s``) from Rademacher probes, with its standard error.

    Deflation (``deflate`` > 0, the default): the variance of plain Hutchinson comes from the few
    large outlying eigenvalues of a network Hessian. ``deflate`` Lanczos steps first build an orthonormal
    basis ``Q`` that captures them; with ``P = Q Q^T`` the exact identity
    ``tr(A) = tr(Q^T A Q) + tr(A (I - P))`` splits the trace into a part known exactly (the sum of the
    Lanczos coefficients ``q_j^T A q_j``) and a remainder estimated by ``z^T A (I - P) z`` over
    Rademacher probes ``z``, whose standard error is ``std(samples, ddof=1) / sqrt(probes)`` (given
    ``Q``, which does not depend on the probes). Measured on a trained ``vit-micro`` (batch 128): the
    per-probe standard deviation falls from ~1000 to ~53 for the trace and 35-fold for the sigma-weighted
    trace, so the same standard error needs hundreds of times fewer products. ``deflate=0`` is plain
    Hutchinson (PyHessian's ``trace``). When the Krylov space covers every direction (tiny models), the
    trace is exact and the standard error 0.

    Stops after ``min_probes`` once ``stderr / |estimate| < tol``, or at ``max_probes``. With
    ``per_layer`` each layer's diagonal-block trace is estimated by the same split, from the same
    products (the layers' estimates add up to the total).

    Args:
        deflate: Lanczos steps before the probes (their products count in ``hvps``, not in ``probes``).
        scale: optional flat vector ``s``: the estimate is of ``tr(S H S)``, ``S = diag(s)``.
        block: probes per vectorized call (:meth:`LossHessian.hvp_many`); >1 only pays off for small models.
    Raises:
        ConfigError: ``min_probes`` < 2 or > ``max_probes``; ``deflate`` < 0; ``scale`` of the wrong shape.
    """
    if not 2 <= min_probes <= max_probes:
        raise ConfigError(f"need 2 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
    if deflate < 0:
        raise ConfigError(f"deflate must be >= 0 (Lanczos steps; 0 = plain Hutchinson), got {deflate}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device, "method": method}
    with hessian_of(target, data, opts) as H:
        t0, h0 = time.perf_counter(), H.hvp_count
        if scale is not None and scale.shape != (H.numel,):
            raise ConfigError(f"scale has shape {tuple(scale.shape)}, expected ({H.numel},)")
        s = scale.to(H.device, H.dtype) if scale is not None else None

        def matvec(v: torch.Tensor) -> torch.Tensor:  # A = S H S
            return H.hvp(v) if s is None else s * H.hvp(s * v)

        def matvec_many(V: torch.Tensor) -> torch.Tensor:  # hvp_many takes a single row through hvp
            return H.hvp_many(V) if s is None else s * H.hvp_many(s * V)

        blocks = H.blocks() if per_layer else {}
        bar = progress_bar(deflate + max_probes, "trace", progress)
        exact_part, exact_layers = 0.0, {b: 0.0 for b in blocks}
        Q = None
        if deflate:
            def on_product(q: torch.Tensor, aq: torch.Tensor) -> None:
                prod = q * aq  # diag(A q q^T): its block sums are tr_b(A q q^T)
                for b, sl in blocks.items():
                    exact_layers[b] += float(prod[sl].sum())
                bar.update(1)

            alphas, _, _, Q = lanczos(H, randn(H.numel, generator, H.device, H.dtype), deflate,
                                       matvec=matvec, on_product=on_product)
            exact_part = float(sum(alphas))
        samples: list[float] = []
        layer_samples: dict[str, list[float]] = {b: [] for b in blocks}
        converged = False
        while len(samples) < max_probes:
            m = min(max(1, block), max_probes - len(samples))
            Z = torch.stack([rademacher(H.numel, generator, H.device, H.dtype) for _ in range(m)])
            Zr = Z if Q is None else Z - (Z @ Q.T) @ Q  # (I - P) z
            prods = Z * matvec_many(Zr)
            samples.extend(prods.sum(1).tolist())
            for b, sl in blocks.items():
                layer_samples[b].extend(prods[:, sl].sum(1).tolist())
            bar.update(m)
            if len(samples) >= min_probes:
                est, se = mean_se(samples)
                if se < tol * abs(est + exact_part):
                    converged = True
                    break
        bar.close()
        est, se = mean_se(samples)
        layers = {b: {"estimate": exact_layers[b] + m_, "stderr": se_}
                  for b, (m_, se_) in ((b, mean_se(v)) for b, v in layer_samples.items())} or None
        return TraceResult(exact_part + est, se, len(samples), converged, tol, H.method_used,
                           time.perf_counter() - t0, tuple(samples), layers,
                           deflated=0 if Q is None else Q.shape[0], deflated_part=exact_part,
                           hvps=H.hvp_count - h0)
