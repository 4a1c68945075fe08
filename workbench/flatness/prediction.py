"""The second-order prediction of the loss increase of quantizing weights or layer inputs,
beside the measured increase."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from .. import quant
from ..errors import ConfigError, ModelError
from .hessian import (
    QUANT_LAYERS,
    Batch,
    LossFn,
    LossHessian,
    as_batches,
    model_device,
    preserved_mode,
    quantized_weight_names,
    unfused_attention,
)
from .probes import mean_se, rademacher
from .results import ActQuantPrediction, QuantPrediction
from .trace import hutchinson_trace


def weight_sigma(model: nn.Module, names: Sequence[str], w_bits: int, per_channel: bool = True,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """Flat vector of rounding-noise stds ``step/sqrt(12)`` (per output channel) for ``names``.

    Parameters that are not Linear/Conv weights (biases, norms, embeddings) stay in float under PTQ,
    so their sigma is 0.
    """
    quantized = set(quantized_weight_names(model))
    named = dict(model.named_parameters())
    parts = []
    for n in names:
        w = named[n].detach()
        if n in quantized:
            sd = quant.weight_qparams(w, w_bits, per_channel=per_channel).noise_std
            parts.append(sd.expand_as(w).reshape(-1))
        else:
            parts.append(torch.zeros(w.numel(), device=w.device))
    dev = torch.device(device) if device is not None else model_device(model)
    return torch.cat([p.to(dev, named[names[0]].dtype) for p in parts])


def _quantized_params(H: LossHessian, w_bits: int, per_channel: bool) -> dict[str, torch.Tensor]:
    quantized = set(quantized_weight_names(H.model))
    out = {}
    for n in H.names:
        w = H.param(n)
        if n in quantized:
            out[n] = quant.fake_quantize(w, quant.weight_qparams(w, w_bits, per_channel=per_channel))
    return out


def weight_quant_prediction(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                            w_bits: int = 4, per_channel: bool = True, tol: float = 0.05,
                            min_probes: int = 10, max_probes: int = 100, deflate: int = 20, block: int = 1,
                            noise_samples: int = 8, generator: torch.Generator | None = None,
                            loss_fn: LossFn | None = None,
                            device: str | torch.device | None = None,
                            method: str | None = None) -> QuantPrediction:
    """Predict the loss increase of weight PTQ at ``w_bits`` from curvature, and measure it.

    ``sigma_trace = sum_i sigma_i^2 H_ii = tr(S H S)`` by (deflated, see :func:`hutchinson_trace`)
    Hutchinson with ``S = diag(sigma)`` over the quantized (Linear/Conv) weights only; ``predicted = sigma_trace / 2``. Measured: round-to-nearest per-channel
    symmetric quantization (``quant.fake_quantize``) applied to a functional copy of the weights, and
    the mean over ``noise_samples`` draws of uniform noise with the same per-channel variance.

    Activations stay in float here; see :func:`activation_quant_prediction` for the input Hessian.
    Several bit widths at once: :func:`weight_quant_predictions`.
    """
    return weight_quant_predictions(target, data, w_bits=[w_bits], per_channel=per_channel, tol=tol,
                                    min_probes=min_probes, max_probes=max_probes, deflate=deflate, block=block,
                                    noise_samples=noise_samples, generator=generator, loss_fn=loss_fn,
                                    device=device, method=method)[0]


def weight_quant_predictions(target: LossHessian | nn.Module, data: Batch | Iterable[Batch] | None = None, *,
                             w_bits: Sequence[int] = (4, 3), per_channel: bool = True, tol: float = 0.05,
                             min_probes: int = 10, max_probes: int = 100, deflate: int = 20, block: int = 1,
                             noise_samples: int = 8, generator: torch.Generator | None = None,
                             loss_fn: LossFn | None = None,
                             device: str | torch.device | None = None,
                             method: str | None = None) -> list[QuantPrediction]:
    """:func:`weight_quant_prediction` at each of ``w_bits``, over one Hessian of the quantized weights.

    The per-channel symmetric step is ``max|w| / (2^(b-1) - 1)``, so the noise stds of two bit
    widths differ by one constant factor ``c`` over every channel, ``S_b = c S_a``, and
    ``tr(S_b H S_b) = c^2 tr(S_a H S_a)`` exactly. The trace is estimated once, at the first width,
    and scaled for the others (its standard error too), which saves a deflated Hutchinson run per
    extra width. A width whose stds are not such a multiple (a channel of zeros, whose step is
    clamped) gets its own estimate. The measured increases are measured at every width.
    """
    bits = [quant.check_bits(b, "w_bits") for b in w_bits]
    if not bits:
        raise ConfigError("w_bits is empty: pass at least one weight bit width, e.g. w_bits=[4, 3]")
    if isinstance(target, LossHessian):  # same data and options, but over the quantized weights only
        model, data = target.model, target.batches
        loss_fn, device, method = target.loss_fn, target.device, method or target.method
        distributed = target.distributed
    else:
        model, distributed = target, None
    names = quantized_weight_names(model)
    if not names:
        raise ModelError("the model has no Linear/Conv weights requiring grad: nothing is weight-quantized")
    if data is None:
        raise ConfigError("pass data=(x, y) (or a list of batches) together with a model")
    target = LossHessian(model, data, loss_fn=loss_fn, params=names, device=device, method=method or "auto",
                         distributed=distributed)
    out = []
    with target as H:
        clean_loss, clean_accuracy = H.loss(accuracy=True)  # type: ignore[misc]
        grad_flat = H.gradient()
        first_sig: torch.Tensor | None = None
        first_tr = None
        for b in bits:
            t0 = time.perf_counter()
            sig = weight_sigma(H.model, H.names, b, per_channel, H.device)
            c = _common_factor(sig, first_sig)
            if c is None:
                tr = hutchinson_trace(H, tol=tol, min_probes=min_probes, max_probes=max_probes, deflate=deflate,
                                      scale=sig, block=block, generator=generator)
                estimate, stderr, probes, converged = tr.estimate, tr.stderr, tr.probes, tr.converged
                if first_sig is None:
                    first_sig, first_tr = sig, tr
            else:
                assert first_tr is not None  # a common factor needs the first width's estimate
                estimate, stderr = c * c * first_tr.estimate, c * c * first_tr.stderr
                probes, converged = first_tr.probes, first_tr.converged
            qparams = _quantized_params(H, b, per_channel)
            quant_loss, quant_accuracy = H.loss(qparams, accuracy=True)  # type: ignore[misc]
            delta = H.flatten([qparams[n] - H.param(n) for n in H.names])
            first = float(grad_flat @ delta)
            # uniform noise on [-step/2, step/2] has std step/sqrt(12) = sigma: half-width sqrt(3) sigma
            incs = []
            for _ in range(noise_samples):
                u = torch.rand(H.numel, generator=generator,
                               device=generator.device if generator is not None else "cpu").to(H.device)
                incs.append(H.perturbed_loss((2 * u - 1) * math.sqrt(3.0) * sig) - clean_loss)
            mn, mse = mean_se(incs) if incs else (math.nan, math.nan)
            out.append(QuantPrediction(b, estimate, stderr, estimate / 2, stderr / 2,
                                       quant_loss - clean_loss, mn, mse, clean_loss, quant_loss, clean_accuracy,
                                       quant_accuracy, first, probes, converged, H.numel, time.perf_counter() - t0))
    return out


def _common_factor(sig: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    """``c`` with ``sig == c * ref`` elementwise (to float round-off), or None if there is none."""
    if ref is None:
        return None
    nz = ref != 0
    if not bool(nz.any()) or not torch.equal(nz, sig != 0):
        return None
    c = float(sig[nz][0] / ref[nz][0])
    return c if torch.allclose(sig, c * ref, rtol=1e-5, atol=0.0) else None


class _InputSites:
    """Forward pre-hooks on Linear/Conv layers that add a perturbation to, or quantize, their input."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
        self.mode: str | None = None  # None | "record" | "add" | "quant"
        self.delta: dict[str, torch.Tensor] = {}
        self.qparams: dict[str, quant.QParams] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if self.mode == "record":
                self.shapes[name] = tuple(x.shape)
                self.lo[name] = min(self.lo.get(name, math.inf), float(x.detach().min()))
                self.hi[name] = max(self.hi.get(name, -math.inf), float(x.detach().max()))
            elif self.mode == "add":
                return (x + self.delta[name],) + args[1:]
            elif self.mode == "quant":
                return (quant.fake_quantize(x, self.qparams[name]),) + args[1:]
            return None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def activation_quant_prediction(model: nn.Module, data: Batch | Iterable[Batch], *, a_bits: int = 8,
                                tol: float = 0.05, min_probes: int = 10, max_probes: int = 100,
                                block: int = 1, noise_samples: int = 8, generator: torch.Generator | None = None,
                                loss_fn: LossFn | None = None, per_layer: bool = False, measure: bool = True,
                                device: str | torch.device | None = None) -> ActQuantPrediction:
    """Predict the loss increase of quantizing Linear/Conv inputs at ``a_bits`` from the input Hessian.

    Forward pre-hooks add a perturbation ``delta_l`` (zero at the expansion point) to each Linear/Conv
    input; Hutchinson probes ``sigma_l z`` on ``d^2 L / d delta^2`` (forward-over-reverse) give
    ``sum sigma_l^2 H_ii``. Ranges are per-tensor min/max over the given data, the quantizer is
    quant's asymmetric one (the PTQ default). Weights stay in float here. Not covered: the attention
    matmul inputs (q, k, softmax output) that PTQ may also quantize, since they are not module inputs.
    ``block`` probes go through one ``vmap``-ed call (pays off for small models). With ``per_layer``
    each input's diagonal block is estimated from the same probes (``z_l . (H z)_l``: the cross
    terms average out, as in :func:`hutchinson_trace`), which prices every layer's activation
    width separately (:func:`workbench.ptq.mixed.activation_sensitivities`). ``measure=False`` skips
    the measured side (clean, rounded and noisy losses: NaN), for a prediction alone or a loss
    that is not a classifier's.

    Raises:
        ModelError: the model has no Linear/Conv layer.
    """
    a_bits = quant.check_bits(a_bits, "a_bits")
    batches = as_batches(data)
    lf = loss_fn or F.cross_entropy
    dev = torch.device(device) if device is not None else model_device(model)
    t0 = time.perf_counter()
    with preserved_mode(model, train=False):
        sites = _InputSites(model)
        try:
            if not sites.names:
                raise ModelError("the model has no Linear/Conv layer: no activations are quantized")
            state = {n: t.detach().to(dev) for n, t in model.state_dict(keep_vars=True).items()}
            data_d = [(x.to(dev), y.to(dev)) for x, y in batches]
            total = sum(x.shape[0] for x, _ in data_d)
            weights = [x.shape[0] / total for x, _ in data_d]

            def run(x: torch.Tensor) -> torch.Tensor:
                return functional_call(model, (state,), (x,))

            def evaluate() -> tuple[float, float]:
                loss = correct = 0.0
                with torch.no_grad():
                    for (x, y), w in zip(data_d, weights):
                        out = run(x)
                        loss += w * float(lf(out, y))
                        correct += float((out.argmax(-1) == y).sum())
                return loss, 100.0 * correct / total

            shapes = []
            for x, _ in data_d:
                sites.mode, sites.shapes = "record", {}
                with torch.no_grad():
                    run(x)
                shapes.append(dict(sites.shapes))
            sites.mode = None
            sites.qparams = {n: quant.activation_qparams(sites.lo[n], sites.hi[n], a_bits) for n in sites.names}
            sig = {n: float(sites.qparams[n].noise_std) for n in sites.names}

            def loss_at(delta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                sites.delta = delta
                return lf(run(x), y)

            samples: list[float] = []
            site_samples: dict[str, list[float]] = {n: [] for n in sites.names}
            converged = False
            sites.mode = "add"
            with unfused_attention(model):
                while len(samples) < max_probes:
                    m = min(max(1, block), max_probes - len(samples))
                    sample = torch.zeros(m, dtype=torch.float64)
                    by_site = {n: torch.zeros(m, dtype=torch.float64) for n in sites.names}
                    for (x, y), w, shp in zip(data_d, weights, shapes):
                        zero = {n: torch.zeros(s, device=dev) for n, s in shp.items()}
                        z = {n: torch.stack([rademacher(math.prod(s), generator, dev).view(s) for _ in range(m)])
                             * sig[n] for n, s in shp.items()}

                        def hvp(v: dict[str, torch.Tensor], x: torch.Tensor = x, y: torch.Tensor = y,
                                zero: dict[str, torch.Tensor] = zero) -> dict[str, torch.Tensor]:
                            return jvp(lambda d: grad(loss_at)(d, x, y), (zero,), (v,))[1]

                        hz = torch.func.vmap(hvp)(z) if m > 1 else {n: t[None] for n, t in hvp(
                            {n: t[0] for n, t in z.items()}).items()}
                        for n in shp:
                            part = w * (z[n] * hz[n]).reshape(m, -1).sum(1).double().cpu()
                            sample += part
                            by_site[n] += part
                    samples.extend(sample.tolist())
                    for n, t in by_site.items():
                        site_samples[n].extend(t.tolist())
                    if len(samples) >= min_probes:
                        est, se = mean_se(samples)
                        if se < tol * abs(est):
                            converged = True
                            break
            sites.mode = None
            clean_loss = clean_accuracy = quant_loss = quant_accuracy = math.nan
            if measure:
                clean_loss, clean_accuracy = evaluate()
                sites.mode = "quant"
                quant_loss, quant_accuracy = evaluate()
            incs = []
            sites.mode = "add"
            for _ in range(noise_samples if measure else 0):
                loss = 0.0
                with torch.no_grad():
                    for (x, y), w, shp in zip(data_d, weights, shapes):
                        sites.delta = {n: (2 * torch.rand(math.prod(s), generator=generator).view(s) - 1).to(dev)
                                       * math.sqrt(3.0) * sig[n] for n, s in shp.items()}
                        loss += w * float(lf(run(x), y))
                incs.append(loss - clean_loss)
        finally:
            sites.mode = None
            sites.delta = {}
            sites.remove()
    est, se = mean_se(samples)
    mn, mse = mean_se(incs) if incs else (math.nan, math.nan)
    layers = elements = None
    if per_layer:
        layers = {n: dict(zip(("estimate", "stderr"), mean_se(v))) for n, v in site_samples.items()}
        elements = {n: math.prod(shapes[0][n][1:]) for n in sites.names if n in shapes[0]}
    return ActQuantPrediction(a_bits, est, se, est / 2, se / 2, quant_loss - clean_loss, mn, mse, clean_loss,
                              quant_loss, clean_accuracy, quant_accuracy, len(samples), converged, len(sites.names),
                              time.perf_counter() - t0, layers, elements)
