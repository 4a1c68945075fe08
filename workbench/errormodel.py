"""Measure real quantization errors and compare them with the Gaussian/uniform noise model.

For a model, target ``(w_bits, a_bits)`` and a few calibration batches, :func:`measure` returns
one tidy row per layer and error kind:

* ``wqe``: ``Q(W) - W`` of every Linear/Conv weight, symmetric per output channel;
* ``aqe``: ``Q(x) - x`` of every Linear/Conv input, asymmetric per tensor, the range being the
  min/max over all calibration batches (what a min-max PTQ observer would pick);
* with ``include_attention=True`` (timm ViTs), also the inputs of the attention matmuls:
  ``q``, ``k`` (after their optional norms), ``v`` and the softmax output ``attn``. These are
  captured with forward hooks on ``q_norm``/``k_norm``/``attn_drop`` and on the ``qkv``
  projection (``v`` is its last third); the fused attention kernel, which bypasses those
  modules, is switched off during the measurement only. ``q`` is recorded before the
  ``head_dim**-0.5`` scaling: scaling changes the error's std but not its ratio or shape.

The quantizers are those of :mod:`workbench.quant`, i.e. the ones PTQ applies.

Columns: ``layer, kind, site, bits, numel, samples, step, std, pred_std, ratio, mean,
max_err_over_step, kurtosis, ks_gaussian, ks_uniform, channels, channel_ratio_min,
channel_ratio_median, channel_ratio_max, step_spread``.

* ``std`` is the empirical std of the errors; ``pred_std`` the model's ``step/sqrt(12)``. For
  per-channel weights the prediction is the RMS over channels of ``step_c/sqrt(12)`` (the std
  of the pooled errors if every channel follows the model); ``channel_ratio_*`` compare each
  channel on its own (outlier channels show up there), ``step_spread`` is the largest channel
  step over the median one.
* Shape statistics (excess ``kurtosis``: Gaussian 0, uniform -1.2; Kolmogorov-Smirnov distances
  to a Gaussian and to a uniform distribution of the same mean and variance) are computed on the
  errors divided by their own step, so that channels with different steps can be pooled.
* Statistics use at most ``max_samples`` random elements per row (errors are elementwise, so
  this is an unbiased subsample); ``numel`` counts all elements seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import quant
from .errors import ConfigError, ModelError
from .noise import select_layers

log = logging.getLogger(__name__)

KINDS = ("wqe", "aqe")
COLUMNS = ("layer", "kind", "site", "bits", "numel", "samples", "step", "std", "pred_std", "ratio", "mean",
           "max_err_over_step", "kurtosis", "ks_gaussian", "ks_uniform", "channels", "channel_ratio_min",
           "channel_ratio_median", "channel_ratio_max", "step_spread")


# ---- statistics ----------------------------------------------------------------------------
def ks_distance(samples: torch.Tensor, cdf: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Kolmogorov-Smirnov distance ``sup |F_n(x) - F(x)|`` between a sample and a CDF."""
    x = samples.detach().flatten().double().sort().values
    n = x.numel()
    if n == 0:
        return float("nan")
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def gaussian_cdf(mean: float, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: 0.5 * (1.0 + torch.erf((x - mean) / (max(std, 1e-300) * math.sqrt(2.0))))


def uniform_cdf(mean: float, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    half = max(std, 1e-300) * math.sqrt(3.0)  # uniform on [m - half, m + half] has this std
    return lambda x: ((x - mean + half) / (2 * half)).clamp(0.0, 1.0)


def shape_stats(u: torch.Tensor) -> dict[str, float]:
    """Excess kurtosis and KS distances to a Gaussian and a uniform of the same mean/variance."""
    u = u.detach().flatten().double()
    mean = float(u.mean())
    c = u - mean
    m2 = float((c * c).mean())
    std = math.sqrt(m2)
    kurt = float((c**4).mean()) / (m2 * m2) - 3.0 if m2 > 0 else float("nan")
    return {"kurtosis": kurt, "ks_gaussian": ks_distance(u, gaussian_cdf(mean, std)),
            "ks_uniform": ks_distance(u, uniform_cdf(mean, std))}


def _subsample(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    x = x.flatten()
    if x.numel() <= n:
        return x
    idx = torch.randint(0, x.numel(), (n,), generator=gen)
    return x[idx.to(x.device)]


# ---- weights ---------------------------------------------------------------------------------
def weight_error_row(name: str, w: torch.Tensor, bits: int, max_samples: int = 100_000,
                     gen: torch.Generator | None = None) -> dict[str, Any]:
    """One ``wqe`` row for a weight tensor (output channels along dim 0)."""
    gen = gen or torch.Generator().manual_seed(0)
    w = w.detach().float().cpu()
    qp = quant.weight_qparams(w, bits)  # symmetric, per output channel
    err = quant.quantization_error(w, qp)
    step_c = qp.step.flatten()  # (C,)
    pred_c = step_c / math.sqrt(12.0)
    err_c = err.reshape(w.shape[0], -1)
    chan_ratio = err_c.std(dim=1, unbiased=False) / pred_c if err_c.shape[1] > 1 else torch.full_like(pred_c, float("nan"))
    pred = float(pred_c.square().mean().sqrt())
    std = float(err.std(unbiased=False))
    u = (err / qp.step).flatten()
    return {
        "layer": name, "kind": "wqe", "site": "weight", "bits": bits, "numel": w.numel(),
        "samples": min(w.numel(), max_samples), "step": float(step_c.mean()), "std": std, "pred_std": pred,
        "ratio": std / pred if pred > 0 else float("nan"), "mean": float(err.mean()),
        "max_err_over_step": float(u.abs().max()),
        **shape_stats(_subsample(u, max_samples, gen)),
        "channels": int(w.shape[0]), "channel_ratio_min": float(chan_ratio.min()),
        "channel_ratio_median": float(chan_ratio.median()), "channel_ratio_max": float(chan_ratio.max()),
        "step_spread": float(step_c.max() / step_c.median().clamp_min(quant.EPS_STEP)),
    }


# ---- activations ---------------------------------------------------------------------------
class _Observer:
    """Running min/max and a random subsample of one activation tensor."""

    def __init__(self, per_batch: int, gen: torch.Generator) -> None:
        self.xmin = math.inf
        self.xmax = -math.inf
        self.numel = 0
        self.per_batch = per_batch
        self.gen = gen
        self.samples: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point() or x.numel() == 0:
            return
        mn, mx = torch.aminmax(x)
        self.xmin, self.xmax = min(self.xmin, float(mn)), max(self.xmax, float(mx))
        self.numel += x.numel()
        self.samples.append(_subsample(x, self.per_batch, self.gen).float().cpu())


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    need = ("qkv", "q_norm", "k_norm", "attn_drop", "num_heads", "head_dim", "fused_attn")
    return [(n, m) for n, m in model.named_modules() if all(hasattr(m, a) for a in need)]


def _attach_observers(model: nn.Module, layers: list[tuple[str, nn.Module]], include_attention: bool | None,
                      per_batch: int, gen: torch.Generator) -> tuple[dict[str, tuple[str, _Observer]], list, list]:
    obs: dict[str, tuple[str, _Observer]] = {}
    hooks: list[Any] = []
    fused: list[tuple[nn.Module, bool]] = []
    for name, m in layers:
        o = obs.setdefault(name, ("input", _Observer(per_batch, gen)))[1]
        hooks.append(m.register_forward_pre_hook(lambda mod, args, o=o: o(args[0]) if args else None))
    # None: the attention matmuls where the model has them (ViTs), none elsewhere (CNNs)
    attn = _attention_modules(model) if include_attention is not False else []
    if include_attention and not attn:
        raise ModelError(f"include_attention=True but {type(model).__name__} has no timm Attention module; "
                         "use include_attention=None (where present) or False")
    if attn:
        for name, m in attn:
            fused.append((m, m.fused_attn))
            m.fused_attn = False  # the unfused path runs the softmax through attn_drop
            for site, sub in (("q", m.q_norm), ("k", m.k_norm), ("attn", m.attn_drop)):
                o = obs.setdefault(f"{name}.{site}", (site, _Observer(per_batch, gen)))[1]
                hooks.append(sub.register_forward_hook(lambda mod, args, out, o=o: o(out)))
            o = obs.setdefault(f"{name}.v", ("v", _Observer(per_batch, gen)))[1]
            nh, hd = m.num_heads, m.head_dim

            def grab_v(mod, args, out, o=o, nh=nh, hd=hd):
                b, n = out.shape[0], out.shape[1]
                o(out.reshape(b, n, 3, nh, hd)[:, :, 2])

            hooks.append(m.qkv.register_forward_hook(grab_v))
    return obs, hooks, fused


def _run_batches(model: nn.Module, batches: Iterable[Any], max_batches: int) -> int:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = 0
    with torch.no_grad():
        for batch in batches:
            if n >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            n += 1
    if n == 0:
        raise ConfigError("no calibration batches were given")
    return n


def _activation_row(name: str, site: str, o: _Observer, bits: int, max_samples: int,
                    gen: torch.Generator) -> dict[str, Any] | None:
    if o.numel == 0:
        return None
    qp = quant.activation_qparams(o.xmin, o.xmax, bits)  # asymmetric, per tensor
    x = _subsample(torch.cat(o.samples), max_samples, gen)
    err = quant.quantization_error(x, qp)
    step = float(qp.step)
    pred = step / math.sqrt(12.0)
    std = float(err.std(unbiased=False))
    u = err / step
    return {
        "layer": name, "kind": "aqe", "site": site, "bits": bits, "numel": o.numel, "samples": x.numel(),
        "step": step, "std": std, "pred_std": pred, "ratio": std / pred, "mean": float(err.mean()),
        "max_err_over_step": float(u.abs().max()), **shape_stats(u),
        "channels": None, "channel_ratio_min": None, "channel_ratio_median": None, "channel_ratio_max": None,
        "step_spread": None,
    }


def _check_bits(w_bits: int | None, a_bits: int | None) -> None:
    if w_bits is None and a_bits is None:
        raise ConfigError("give w_bits and/or a_bits")
    if w_bits is not None:
        quant.check_bits(w_bits, "w_bits")
    if a_bits is not None:
        quant.check_bits(a_bits, "a_bits")


def measure(model: nn.Module, batches: Iterable[Any], w_bits: int | None, a_bits: int | None, *,
            include_attention: bool | None = False, max_batches: int = 4, max_samples: int = 100_000,
            include: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = (), seed: int = 0) -> list[dict[str, Any]]:
    """Measure WQE and AQE per layer; one tidy row per (layer, kind). See the module docstring.

    Args:
        model: any model with Linear/Conv layers; measured in eval mode (its mode is restored).
        batches: calibration batches, ``(images, labels)`` or images (moved to the model's device).
        w_bits, a_bits: target bits (2..16); ``None`` skips that kind.
        include_attention: also the attention matmul inputs of timm ViTs (``q, k, v, attn``);
            ``None``: where the model has attention modules, ``True`` refuses a model without.
        max_batches: calibration batches used (AQE only; WQE needs no data).
        max_samples: elements per row used for the statistics.
        include, exclude: fnmatch patterns on layer names.

    Returns:
        A list of dicts with the keys in :data:`COLUMNS` (``pandas.DataFrame(rows)`` for a table).

    Raises:
        ConfigError: bad bits or no batches. ModelError: no Linear/Conv layer (or no attention).
    """
    _check_bits(w_bits, a_bits)
    layers = select_layers(model, tuple(include), tuple(exclude))
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    if w_bits is not None:
        seen: set[int] = set()
        for name, m in layers:
            if id(m.weight) not in seen:
                seen.add(id(m.weight))
                rows.append(weight_error_row(name, m.weight, w_bits, max_samples, gen))
    if a_bits is not None:
        obs_rows = _measure_activations(model, batches, layers, a_bits, include_attention, max_batches,
                                        max_samples, gen)
        rows.extend(obs_rows)
    return rows


def _collect(model: nn.Module, batches: Iterable[Any], layers: list[tuple[str, nn.Module]],
             include_attention: bool, max_batches: int, per_batch: int,
             gen: torch.Generator) -> dict[str, tuple[str, _Observer]]:
    was_training = model.training
    obs, hooks, fused = _attach_observers(model, layers, include_attention, per_batch, gen)
    model.eval()
    try:
        _run_batches(model, batches, max_batches)
    finally:
        for h in hooks:
            h.remove()
        for m, f in fused:
            m.fused_attn = f
        model.train(was_training)
    return obs


def _measure_activations(model, batches, layers, a_bits, include_attention, max_batches, max_samples, gen):
    obs = _collect(model, batches, layers, include_attention, max_batches,
                   max(1, max_samples // max(1, max_batches)), gen)
    rows = []
    for name, (site, o) in obs.items():
        row = _activation_row(name, site, o, a_bits, max_samples, gen)
        if row is not None:
            rows.append(row)
    return rows


def error_samples(model: nn.Module, batches: Iterable[Any] | None, layer: str, kind: str, bits: int, *,
                  n: int = 10_000, max_batches: int = 4, normalized: bool = False,
                  seed: int = 0) -> torch.Tensor:
    """Raw quantization errors ``Q(t) - t`` of one layer, subsampled to ``n``, for histograms.

    Args:
        layer: a layer name as in :func:`measure`'s rows (attention sites: ``'<attn>.q'`` etc.).
        kind: ``'wqe'`` (no batches needed) or ``'aqe'``.
        normalized: divide by the step (per channel for weights), giving values in [-1/2, 1/2].

    Raises:
        ConfigError: unknown kind or bits. ModelError: no such layer.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    bits = quant.check_bits(bits)
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    if kind == "wqe":
        m = modules.get(layer)
        if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise ModelError(f"no layer with a weight named {layer!r}")
        w = m.weight.detach().float().cpu()
        qp = quant.weight_qparams(w, bits)
        err = quant.quantization_error(w, qp)
        return _subsample(err / qp.step if normalized else err, n, gen)
    site = layer.rsplit(".", 1)[-1]
    attention = site in ("q", "k", "v", "attn") and layer not in modules
    if attention:
        layers = select_layers(model)
    else:
        if not isinstance(modules.get(layer), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ModelError(f"no Linear/Conv layer named {layer!r}")
        layers = [(layer, modules[layer])]
    if batches is None:
        raise ConfigError("kind='aqe' needs calibration batches")
    obs = _collect(model, batches, layers, attention, max_batches, max(1, n // max(1, max_batches)) * 4, gen)
    if layer not in obs:
        raise ModelError(f"no attention site named {layer!r}")
    o = obs[layer][1]
    qp = quant.activation_qparams(o.xmin, o.xmax, bits)
    err = quant.quantization_error(_subsample(torch.cat(o.samples), n, gen), qp)
    return err / qp.step if normalized else err
