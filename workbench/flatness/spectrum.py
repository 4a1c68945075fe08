"""The top of the Hessian spectrum (power iteration, Lanczos with Ritz bounds), Ritz values of a
small matrix, and the spectral density by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .hessian import Batch, LossFn, LossHessian, hessian_of
from .probes import randn
from .results import DensityResult, EigenResult


def top_eigenvalues(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                    k: int = 1, tol: float = 1e-3, max_iter: int = 100, algorithm: str = "lanczos",
                    generator: torch.Generator | None = None, return_vectors: bool = False,
                    loss_fn: LossFn | None = None, params: str | Sequence[str] | None = None,
                    device: str | torch.device | None = None, method: str | None = None) -> EigenResult:
    """Top-k (largest algebraic) Hessian eigenvalues.

    Args:
        target: a :class:`LossHessian`, or a model (then ``data`` and the Hessian options apply).
        k: how many eigenvalues.
        tol: relative tolerance: Lanczos stops when every Ritz residual bound ``|beta_j s_jk|`` is
            below ``tol * |theta_k|``; power iteration when ``|lambda_t - lambda_{t-1}| < tol |lambda_t|``.
        max_iter: Lanczos steps in all, or power iterations per eigenvalue.
        algorithm: ``lanczos`` (default; full reorthogonalization, far fewer products than power
            iteration for the same accuracy) or ``power`` (power iteration with deflation, PyHessian's
            algorithm, which finds the largest-*magnitude* eigenvalues).
    Raises:
        ConfigError: k < 1 or k larger than the number of parameters; unknown algorithm.
    """
    if algorithm not in ("lanczos", "power"):
        raise ConfigError(f"algorithm must be 'lanczos' or 'power', got {algorithm!r}")
    opts = {"loss_fn": loss_fn, "params": params, "device": device, "method": method}
    with hessian_of(target, data, opts) as H:
        if not 1 <= k <= H.numel:
            raise ConfigError(f"k={k} must be between 1 and the number of parameters ({H.numel})")
        t0, h0 = time.perf_counter(), H.hvp_count
        if algorithm == "power":
            vals, res, vecs, iters, conv = _power(H, k, tol, max_iter, generator)
        else:
            vals, res, vecs, iters, conv = _lanczos_top(H, k, tol, max_iter, generator)
        return EigenResult(tuple(vals), tuple(res), iters, H.hvp_count - h0, conv, tol, algorithm,
                           H.method_used, time.perf_counter() - t0,
                           tuple(v.cpu() for v in vecs) if return_vectors else None)


def _power(H: LossHessian, k: int, tol: float, max_iter: int, gen: torch.Generator | None):
    vals, res, vecs, iters, conv_all = [], [], [], 0, True
    for _ in range(k):
        v = randn(H.numel, gen, H.device, H.dtype)
        v /= v.norm()
        lam, conv, hv = None, False, v
        for _ in range(max_iter):
            for u in vecs:  # deflation: stay orthogonal to the eigenvectors found so far
                v -= (u @ v) * u
            v /= v.norm().clamp_min(1e-30)
            hv = H.hvp(v)
            iters += 1
            new = float(hv @ v)
            nrm = hv.norm()
            if lam is not None and abs(new - lam) < tol * (abs(lam) + 1e-12):
                lam, conv = new, True
                break
            lam = new
            if nrm == 0:
                conv = True
                break
            v = hv / nrm
        vals.append(lam)
        res.append(float((hv - lam * v).norm()))
        vecs.append(v)
        conv_all &= conv
    return vals, res, vecs, iters, conv_all


def lanczos(H: LossHessian, v0: torch.Tensor, steps: int,
             check: Callable[[list[float], list[float], float], bool] | None = None,
             matvec: Callable[[torch.Tensor], torch.Tensor] | None = None,
             on_product: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
    """Lanczos with full reorthogonalization, on ``H.hvp`` (or on ``matvec`` when given).

    ``on_product(q, A q)`` sees every product before it is orthogonalized.
    Returns ``(alphas, betas, b_last, Q)``: the tridiagonal coefficients (``len(betas) == m - 1``),
    the norm of the final residual (0 when the Krylov space is exhausted) and the basis ``Q`` (m, n).
    """
    n = H.numel
    steps = min(steps, n)
    mv = matvec or H.hvp
    # the basis grows as needed: allocating max_iter rows up front costs seconds on ResNet-18 (4.5 GB at 100)
    Q = torch.empty(min(steps, 16), n, device=H.device, dtype=H.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    q = v0 / v0.norm()
    b = 0.0
    for j in range(steps):
        if j == Q.shape[0]:
            grown = torch.empty(min(2 * j, steps), n, device=H.device, dtype=H.dtype)
            grown[:j] = Q
            Q = grown
        Q[j] = q
        w = mv(q)
        if on_product is not None:
            on_product(q, w)
        a = float(w @ q)
        alphas.append(a)
        # the three-term recurrence removes the large components; one full reorthogonalization pass then
        # keeps the Ritz values free of ghost copies (a second pass costs ~20% of a product on ResNet-18)
        w -= a * q
        if j > 0:
            w -= b * Q[j - 1]
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(w.norm())
        if b < 1e-10 * max(1.0, abs(a)) or j + 1 == n:
            b = 0.0  # invariant subspace / whole space: the Ritz values are exact
            break
        if j + 1 == steps or (check is not None and check(alphas, betas, b)):
            break
        betas.append(b)
        q = w / b
    return alphas, betas, b, Q[: len(alphas)]


def _tridiag(alphas: Sequence[float], betas: Sequence[float]) -> torch.Tensor:
    a = torch.as_tensor(alphas, dtype=torch.float64)
    b = torch.as_tensor(betas, dtype=torch.float64)[: len(a) - 1]
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def ritz_values(matrix: torch.Tensor, steps: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` Lanczos steps on an explicit symmetric matrix from a random start: the Ritz
    values (the eigenvalues of the tridiagonal ``T``), largest first. The same Lanczos the
    Hessian estimators run, on a matrix small enough to check against ``torch.linalg.eigvalsh``:
    the extreme eigenvalues converge first, in far fewer steps than the dimension.

    Raises:
        ConfigError: ``matrix`` is not square and symmetric, or ``steps`` < 1.
    """
    from types import SimpleNamespace

    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or not torch.allclose(matrix, matrix.T):
        raise ConfigError(f"ritz_values needs a square symmetric matrix, got shape {tuple(matrix.shape)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    n = matrix.shape[0]
    target = SimpleNamespace(numel=n, device=matrix.device, dtype=matrix.dtype, hvp=lambda v: matrix @ v)
    alphas, betas, _, _ = lanczos(target, randn(n, generator, matrix.device, matrix.dtype), steps)
    return torch.linalg.eigvalsh(_tridiag(alphas, betas)).flip(0)


def _ritz_top(alphas: Sequence[float], betas: Sequence[float], b_last: float, k: int):
    """Top-k Ritz values (largest first), their residual bounds ``|b_last * s_m,i|`` and vectors of T."""
    theta, S = torch.linalg.eigh(_tridiag(alphas, betas))
    m = len(alphas)
    top = torch.arange(m - 1, max(m - 1 - k, -1), -1)
    return theta[top], (b_last * S[-1, top]).abs(), S[:, top]


def _lanczos_top(H: LossHessian, k: int, tol: float, max_iter: int, gen: torch.Generator | None):
    def check(alphas: list[float], betas: list[float], b_next: float) -> bool:
        if len(alphas) < k:
            return False
        theta, bounds, _ = _ritz_top(alphas, betas, b_next, k)
        return bool((bounds <= tol * theta.abs().clamp_min(1e-12)).all())

    alphas, betas, b_last, Q = lanczos(H, randn(H.numel, gen, H.device, H.dtype), max(max_iter, k), check)
    theta, bounds, S = _ritz_top(alphas, betas, b_last, k)
    if len(theta) < k:
        raise ModelError(f"the Krylov space has dimension {len(theta)} < k={k}: the Hessian restricted to "
                         "the start vector's Krylov space is too small (e.g. a zero Hessian)")
    conv = bool((bounds <= tol * theta.abs().clamp_min(1e-12)).all())
    vecs = [S[:, i].to(Q.dtype).to(Q.device) @ Q for i in range(k)]
    return theta.tolist(), bounds.tolist(), vecs, len(alphas), conv


def spectral_density(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                     runs: int = 1, steps: int = 50, grid_size: int = 500, sigma: float | None = None,
                     generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                     params: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                     method: str | None = None) -> DensityResult:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al.; PyHessian's ``density``).

    Each run starts Lanczos from a random unit vector; the Ritz values ``theta_k`` with weights
    ``tau_k = (first component of the k-th Ritz vector)^2`` form a quadrature of the spectral measure.
    The density on a grid is the runs' mean of ``sum_k tau_k N(t; theta_k, sigma^2)``.

    Args:
        runs: independent starting vectors (variance reduction).
        steps: Lanczos steps per run (capped at the parameter count).
        sigma: Gaussian broadening (default 1% of the spectral range).
    """
    if runs < 1 or steps < 1:
        raise ConfigError("runs and steps must be >= 1")
    opts = {"loss_fn": loss_fn, "params": params, "device": device, "method": method}
    with hessian_of(target, data, opts) as H:
        t0, h0 = time.perf_counter(), H.hvp_count
        nodes, weights = [], []
        for _ in range(runs):
            alphas, betas, _, _ = lanczos(H, randn(H.numel, generator, H.device, H.dtype), steps)
            theta, S = torch.linalg.eigh(_tridiag(alphas, betas))
            nodes.append(theta)
            weights.append(S[0] ** 2)
        lo = min(float(t.min()) for t in nodes)
        hi = max(float(t.max()) for t in nodes)
        pad = 0.01 * max(hi - lo, 1e-12)
        sig = sigma if sigma is not None else max(hi - lo, 1e-12) * 0.01
        grid = torch.linspace(lo - 5 * sig - pad, hi + 5 * sig + pad, grid_size, dtype=torch.float64)
        dens = torch.zeros_like(grid)
        for th, w in zip(nodes, weights):
            g = torch.exp(-((grid[:, None] - th[None]) ** 2) / (2 * sig**2)) / (sig * math.sqrt(2 * math.pi))
            dens += (g * w[None]).sum(1) / runs
        return DensityResult(tuple(grid.tolist()), tuple(dens.tolist()),
                             tuple(tuple(t.tolist()) for t in nodes), tuple(tuple(w.tolist()) for w in weights),
                             runs, len(nodes[0]), sig, H.hvp_count - h0, time.perf_counter() - t0)


def density_trace(result: DensityResult, numel: int) -> float:
    """Trace implied by an SLQ result: ``numel * mean_runs sum_k tau_k theta_k``."""
    vals = [sum(t * w for t, w in zip(th, ws)) for th, ws in zip(result.nodes, result.weights)]
    return numel * sum(vals) / len(vals)
