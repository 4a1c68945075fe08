"""Learned-step fake quantizers for quantization-aware training (LSQ, Esser et al., ICLR 2020).

The same grids as PTQ (:mod:`workbench.quant`): weights symmetric per output channel on the
restricted signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]``, Linear/Conv inputs asymmetric per tensor
on ``[0, 2^b-1]`` with a zero point, round half to even. What QAT adds:

* the steps are parameters, learned with the weights; they start from the ranges PTQ's min-max
  observer would give (the weight's ``max|w|`` per channel; the first training batch's input
  range, agreed over every process). So before any update a QAT layer computes bit for bit what
  a min-max PTQ layer calibrated on that batch computes (a deeper layer initializes on inputs
  already quantized upstream, where PTQ calibrates on float ones);
* gradients go through the rounding with the straight-through estimator: ``d round(v)/dv = 1``
  inside the grid, 0 where the value is clipped; the step gets LSQ's gradient, scaled by
  ``1 / sqrt(numel * qmax)`` per the paper, so its updates keep pace with the weights';
* the activation zero point is learned as a real number and rounded on the way (LSQ+, Bhalgat
  et al. 2020), so the deployed quantizer still has an integer zero point.

:func:`attach` puts a weight and an input quantizer inside each Linear/Conv, as sub-modules (so
the optimizer, ``DistributedDataParallel`` and the state dict see the steps) driven by a forward
pre-hook. A checkpoint of a QAT run therefore holds the learned steps; :func:`attach` with the
run's settings before loading it gives back the model exactly as it was evaluated.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from . import quant

#: Sub-module names inside each quantized layer (and so in state-dict keys: ``blocks.0.mlp.fc1.lsq_w.step``).
WEIGHT_QUANTIZER, INPUT_QUANTIZER = "lsq_w", "lsq_in"


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (the straight-through estimator)."""
    return v + (torch.round(v) - v).detach()


def _grad_scale(v: torch.Tensor, scale: float) -> torch.Tensor:
    """``v`` forward (bit for bit: ``a - a`` is exactly 0), ``scale * grad`` backward."""
    scaled = v * scale
    return v.detach() + (scaled - scaled.detach())


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """``(clamp(round(x / s) + round(z), qmin, qmax) - round(z)) * s`` with LSQ gradients.

    Forward it equals :func:`workbench.quant.fake_quantize` with step ``s`` and zero point
    ``round(z)``. Backward: straight-through for ``x`` inside the grid, LSQ's gradient for the step
    (scaled by ``grad_scale``) and for a learned zero point.
    """
    s = _grad_scale(step, grad_scale).abs().clamp_min(quant.EPS_STEP)
    z = _round_ste(zero_point) if isinstance(zero_point, torch.Tensor) else float(round(zero_point))
    codes = torch.clamp(_round_ste(x / s) + z, qmin, qmax)
    return (codes - z) * s


class LSQWeightQuantizer(nn.Module):
    """Symmetric per-output-channel weight quantizer with learned steps (init: ``max|w| / qmax``)."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        qp = quant.weight_qparams(weight.detach(), bits, per_channel=True, axis=0)
        self.bits, self.qmin, self.qmax = qp.bits, qp.qmin, qp.qmax
        self.step = nn.Parameter(qp.step.clone())
        self.grad_scale = 1.0 / math.sqrt(weight.numel() * self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lsq_fake_quantize(w, self.step, 0.0, self.qmin, self.qmax, self.grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-channel, symmetric"


class LSQInputQuantizer(nn.Module):
    """Asymmetric per-tensor input quantizer with a learned step and zero point.

    Both start from the min-max range of the first batch it sees (min and max agreed over every
    process), i.e. from what PTQ's min-max observer would set on that batch.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = quant.check_bits(bits, "a_bits")
        self.qmin, self.qmax = quant.qrange(self.bits, symmetric=False)
        self.step = nn.Parameter(torch.ones(()))
        self.zero_point = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        from . import distributed as wdist

        lo_neg, hi = wdist.all_reduce_values([-float(x.min()), float(x.max())], "max")
        qp = quant.activation_qparams(-lo_neg, hi, self.bits)
        self.step.copy_(qp.step.reshape(()))
        self.zero_point.copy_(qp.zero_point.reshape(()))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._init_from(x)
        grad_scale = 1.0 / math.sqrt(x.numel() * self.qmax)
        return lsq_fake_quantize(x, self.step, self.zero_point, self.qmin, self.qmax, grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-tensor, asymmetric"


def _targets(model: nn.Module, include: Sequence[str], exclude: Sequence[str]) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or isinstance(m, nn.modules.conv._ConvTransposeNd):
            continue
        if any(fnmatch.fnmatch(name, p) for p in include) and not any(fnmatch.fnmatch(name, p) for p in exclude):
            out.append((name, m))
    return out


def _pre_hook(layer: nn.Module, args: tuple) -> tuple | None:
    """Quantize the input, and put the quantized weight where the layer's forward reads it."""
    if not getattr(layer, "_lsq_enabled", True):
        return None
    wq = getattr(layer, WEIGHT_QUANTIZER, None)
    if wq is not None:
        # the latent weight stays the Parameter (optimizer, DDP, state dict); the forward reads
        # its quantized version, through which the gradient reaches both it and the step
        layer.__dict__["weight"] = wq(layer._parameters["weight"])  # found before _parameters
    iq = getattr(layer, INPUT_QUANTIZER, None)
    if iq is not None:
        return (iq(args[0]), *args[1:])
    return None


def _post_hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
    layer.__dict__.pop("weight", None)  # the Parameter is what `layer.weight` means again


def attach(model: nn.Module, w_bits: int | None, a_bits: int | None, include: Sequence[str] = ("*",),
           exclude: Sequence[str] = ()) -> list[str]:
    """Give every Linear/Conv matching ``include``/``exclude`` (fnmatch on module names) a
    learned-step weight quantizer (``w_bits``) and input quantizer (``a_bits``); ``None`` leaves
    that side in float. Returns the names of the layers quantized.
    """
    names = []
    for name, layer in _targets(model, include, exclude):
        if w_bits is not None:
            layer.add_module(WEIGHT_QUANTIZER, LSQWeightQuantizer(layer.weight, w_bits).to(layer.weight.device))
        if a_bits is not None:
            layer.add_module(INPUT_QUANTIZER, LSQInputQuantizer(a_bits).to(layer.weight.device))
        layer.register_forward_pre_hook(_pre_hook)
        layer.register_forward_hook(_post_hook)
        names.append(name)
    return names


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The layers :func:`attach` equipped (found by their hook, which a deep copy keeps)."""
    return [m for m in model.modules() if _pre_hook in m._forward_pre_hooks.values()]


def has_quantizers(model: nn.Module) -> bool:
    return bool(quantized_layers(model))


def bits(model: nn.Module) -> tuple[int | None, int | None] | None:
    """``(w_bits, a_bits)`` of the model's learned quantizers (``None`` for a side left in float),
    or ``None`` when the model has none."""
    w = next((m.bits for m in model.modules() if isinstance(m, LSQWeightQuantizer)), None)
    a = next((m.bits for m in model.modules() if isinstance(m, LSQInputQuantizer)), None)
    return (w, a) if has_quantizers(model) else None


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model in full precision inside the block (its latent weights, float inputs)."""
    layers = quantized_layers(model)
    for m in layers:
        m._lsq_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m._lsq_enabled = True


def detach_quantizers(model: nn.Module) -> None:
    """Remove every quantizer and hook: a plain model with the latent weights."""
    for m in quantized_layers(model):
        for hooks, fn in ((m._forward_pre_hooks, _pre_hook), (m._forward_hooks, _post_hook)):
            for key in [k for k, v in hooks.items() if v is fn]:
                del hooks[key]
        for sub in (WEIGHT_QUANTIZER, INPUT_QUANTIZER):
            if sub in m._modules:
                del m._modules[sub]
        m.__dict__.pop("_lsq_enabled", None)
