"""An independent low-bit cross-check of the PTQ engine: the same ranges, quantized by Brevitas.

The ONNX Runtime check (:mod:`workbench.ptq.onnx_export`) runs the quantized model on real integer
kernels, but only at 8 bits (its uint8 QuantizeLinear has no 3- or 4-bit form). Below 8 bits
this module gives a second opinion: :func:`to_brevitas` rebuilds the model with Brevitas
(AMD/Xilinx's quantization library, ``pip install 'flatquant-workbench[xcheck]'``) quant layers
and hands them only the workbench's *ranges*:

* every Linear/Conv that the workbench quantized becomes a Brevitas ``QuantLinear`` /
  ``QuantConv{1,2,3}d`` with the same float weight and bias;
* its weight quantizer is symmetric, narrow range (``[-(2^(b-1)-1), 2^(b-1)-1]``), per output
  channel (or per tensor, as the workbench did) at the layer's bits, with the workbench's
  steps as constant scales;
* its input quantizer is static, per tensor, unsigned with a zero point (``[0, 2^b-1]``; or signed
  narrow range for ``a_symmetric``) at the layer's bits, with the workbench's calibrated scale and
  zero point as constants.

Everything else (dividing by the scale, adding the zero point, rounding, clamping, dequantizing,
the matmul on dequantized values) is Brevitas's own code, so a wrong grid, an off-by-one clamp
bound, a zero point of the wrong sign or a rounding mode other than the one documented in
:mod:`workbench.quant` shows up as an accuracy or output difference. What the check cannot see
is a wrong *range* (the observers'), since both sides use the same one; the 8-bit ONNX check and
the observer tests cover those.

What is compared: the Linear/Conv weights and inputs only. Attention matmul inputs (q, k, v,
softmax) have no Brevitas counterpart in a timm ViT without rewriting the block, so the
quantized copy must come from ``PTQConfig(quant_attn=False)``; then both models quantize exactly
the same tensors, and LayerNorm, softmax, GELU, residuals and biases stay float in both.

One known, explained difference: both round half to even (``torch.round``), but the workbench
rounds ``x / s`` and then adds the integer zero point (``round(x/s) + zp``, the ONNX QuantizeLinear
convention), whereas Brevitas rounds ``x / s + zp``. The two agree except where ``x / s`` is
exactly halfway between two integers and ``zp`` is odd (then the codes differ by one), or within a
float32 ulp of halfway (adding ``zp`` rounds the sum). For continuous activations that is rare:
10 of 34 million input codes on the zoo ViT at W4A4 (500 images), all within 5e-7 of a half, and no
changed prediction. tests/test_brevitas_crosscheck.py tests both the agreement and the tie case.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError
from ..runinfo import model_device
from .engine import QuantizedModel
from .modules import ActQuantizer, QuantAttention, QuantConv, QuantLayer, QuantLinear

#: The install hint of every "brevitas is missing" error.
INSTALL_HINT = "pip install 'flatquant-workbench[xcheck]'"
#: Brevitas warns on every quantized layer with a zero-pointed input that it cannot describe the
#: output as a quantized tensor; the output is a plain float tensor here, which is what we want.
_ACC_ZERO_POINT_WARNING = "Computing zero point of output accumulator not supported yet"
#: The Brevitas quantizer injectors, built on first use by _quantizers().
_QUANTIZERS: tuple[type, type, type] | None = None


def require_brevitas() -> Any:
    """The ``brevitas`` module, or :class:`MissingDependencyError` (an ImportError) naming the extra."""
    try:
        import brevitas  # noqa: F401
        import brevitas.nn
    except ImportError as e:
        raise MissingDependencyError(
            f"the Brevitas cross-check needs brevitas, which is not installed ({e}): {INSTALL_HINT}"
        ) from None
    return brevitas


def _quantizers() -> tuple[type, type, type]:
    """The three Brevitas quantizer injectors: weight, asymmetric input, symmetric input.

    Built on first use (brevitas is an optional extra). Each is completed per layer with
    ``.let(bit_width=..., scaling_init=...)``.
    """
    global _QUANTIZERS
    if _QUANTIZERS is not None:
        return _QUANTIZERS
    require_brevitas()
    from brevitas.core.utils import SingleArgStatelessBuffer
    from brevitas.core.zero_point import ParameterZeroPoint, ZeroZeroPoint
    from brevitas.inject import ExtendedInjector, value
    from brevitas.inject.enum import (
        BitWidthImplType,
        FloatToIntImplType,
        QuantType,
        RestrictValueType,
        ScalingImplType,
        ScalingPerOutputType,
    )
    from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver

    class _Common(ExtendedInjector):
        """What all three share: integer, constant bit width, round to nearest (torch.round, ties to even)."""

        quant_type = QuantType.INT
        bit_width_impl_type = BitWidthImplType.CONST
        float_to_int_impl_type = FloatToIntImplType.ROUND
        # The scale is a constant handed over from the workbench (ScalingImplType.CONST), in
        # float (no power-of-two restriction).
        scaling_impl_type = ScalingImplType.CONST
        restrict_scaling_type = RestrictValueType.FP
        # Brevitas's usual scaling parameter is the *threshold* (largest magnitude), divided by
        # the integer range to get the scale; a float32 division that cannot always reproduce a
        # given scale bit for bit. Brevitas's own decoupled weight quantizers (base.py,
        # WeightNormPerChannelFloatDecoupled) parameterize the scale itself with a unit integer
        # scaling; so do we, so the scale Brevitas divides by is exactly the workbench's step.
        # (For 15 levels about 6 % of float32 scales have no threshold t with t / 15 == scale.)
        # A fresh module per quantizer, not one shared instance: moving one model to another
        # device must not move the buffer under every other model.
        @value
        def int_scaling_impl() -> nn.Module:
            return SingleArgStatelessBuffer(1.0)

    class WeightQuant(_Common, WeightQuantSolver):
        """Symmetric, narrow range, zero point 0; per channel unless ``scaling_per_output_type`` says tensor."""

        narrow_range = True
        signed = True
        zero_point_impl = ZeroZeroPoint
        scaling_per_output_type = ScalingPerOutputType.CHANNEL

    class AsymActQuant(_Common, ActQuantSolver):
        """Static per-tensor unsigned ``[0, 2^b - 1]`` with a constant zero point."""

        narrow_range = False
        signed = False
        scaling_per_output_type = ScalingPerOutputType.TENSOR
        # ParameterZeroPoint holds the zero point in real units (zp * scale) and, with
        # quantize_zero_point, turns it back into the integer round(zp * scale / scale) = zp;
        # Brevitas then computes codes as clamp(round(x / scale + zp), 0, 2^b - 1).
        zero_point_impl = ParameterZeroPoint
        quantize_zero_point = True

    class SymActQuant(_Common, ActQuantSolver):
        """Static per-tensor signed narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (``a_symmetric``)."""

        narrow_range = True
        signed = True
        scaling_per_output_type = ScalingPerOutputType.TENSOR
        zero_point_impl = ZeroZeroPoint

    _QUANTIZERS = (WeightQuant, AsymActQuant, SymActQuant)
    return _QUANTIZERS


def _weight_quant(layer: QuantLayer) -> type | None:
    if layer.w_bits is None:
        return None
    from brevitas.inject.enum import ScalingPerOutputType

    weight_quant = _quantizers()[0]
    step = layer.w_step.detach().clone()  # (out, 1, ...) per channel, () per tensor
    per = ScalingPerOutputType.CHANNEL if layer.per_channel else ScalingPerOutputType.TENSOR
    return weight_quant.let(bit_width=int(layer.w_bits), scaling_init=step, scaling_per_output_type=per)


def _input_quant(aq: ActQuantizer | None) -> type | None:
    if aq is None or aq.mode == "off":  # not quantized (a_bits=None, or a branch calibration never reached)
        return None
    if aq.mode != "quant" or aq.scheme != "uniform":
        raise ConfigError(f"an input quantizer in mode {aq.mode!r} / scheme {aq.scheme!r} has no Brevitas "
                          "counterpart: cross-check a calibrated model with uniform quantizers")
    if aq.scale.numel() != 1:
        raise ConfigError("the Brevitas cross-check compares per-tensor input quantizers; this one has "
                          f"{aq.scale.numel()} scales")
    _, asym, sym = _quantizers()
    scale = aq.scale.detach().clone().float().reshape(())
    if aq.symmetric:
        return sym.let(bit_width=int(aq.bits), scaling_init=scale)
    zp = int(aq.zero_point)
    return asym.let(bit_width=int(aq.bits), scaling_init=scale, zero_point_init=scale * zp)


def _brevitas_layer(wrapper: QuantLayer) -> nn.Module:
    """A Brevitas layer with ``wrapper``'s float weight and bias and its weight/input quantization."""
    import brevitas.nn as qnn

    fp = wrapper.layer
    w = fp.weight
    kw: dict[str, Any] = dict(bias=fp.bias is not None, weight_quant=_weight_quant(wrapper),
                              input_quant=_input_quant(wrapper.input_quant), device=w.device, dtype=w.dtype)
    if isinstance(wrapper, QuantLinear):
        new = qnn.QuantLinear(fp.in_features, fp.out_features, **kw)
    elif isinstance(wrapper, QuantConv):
        cls = {nn.Conv1d: qnn.QuantConv1d, nn.Conv2d: qnn.QuantConv2d, nn.Conv3d: qnn.QuantConv3d}.get(type(fp))
        if cls is None:
            raise ConfigError(f"{type(fp).__name__} has no Brevitas counterpart here (Conv1d/2d/3d only)")
        new = cls(fp.in_channels, fp.out_channels, fp.kernel_size, stride=fp.stride, padding=fp.padding,
                  dilation=fp.dilation, groups=fp.groups, padding_mode=fp.padding_mode, **kw)
    else:
        raise ConfigError(f"unknown quantized layer type {type(wrapper).__name__}")
    with torch.no_grad():
        new.weight.copy_(w.detach())
        if fp.bias is not None:  # the workbench's bias (bias correction may have changed it): float in both
            new.bias.copy_(fp.bias.detach())
    return new


def check_comparable(qmodel: QuantizedModel) -> None:
    """Raise :class:`ConfigError` unless every quantized tensor of ``qmodel`` has a Brevitas counterpart here.

    Attention matmul inputs have none (see the module docstring): quantize with ``quant_attn=False``.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ConfigError(f"to_brevitas needs a QuantizedModel from quantize_model, got {type(qmodel).__name__}")
    if any(isinstance(m, QuantAttention) for m in qmodel.model.modules()):
        raise ConfigError("the Brevitas cross-check compares Linear/Conv quantization only: quantize with "
                          "PTQConfig(quant_attn=False) so that attention matmuls stay float in both models")
    owned = {id(m.input_quant) for _, m in qmodel.quant_layers() if m.input_quant is not None}
    stray = [n for n, m in qmodel.model.named_modules() if isinstance(m, ActQuantizer) and id(m) not in owned]
    if stray:
        raise ConfigError(f"quantizers outside Linear/Conv inputs have no Brevitas counterpart: {stray[:3]}")


def to_brevitas(qmodel: QuantizedModel) -> nn.Module:
    """A Brevitas model with ``qmodel``'s float weights and quantization ranges (see the module docstring).

    A deep copy of the float model in which every Linear/Conv that the workbench quantized is a
    Brevitas quant layer; the copy is in eval mode on ``qmodel``'s device. ``qmodel`` is unchanged.

    Raises:
        MissingDependencyError: brevitas is not installed (``pip install 'flatquant-workbench[xcheck]'``).
        ConfigError: ``qmodel`` quantizes something other than Linear/Conv weights and inputs
            (e.g. attention matmuls: use ``PTQConfig(quant_attn=False)``).
    """
    require_brevitas()
    check_comparable(qmodel)
    model = copy.deepcopy(qmodel.model)
    # the wrappers are replaced by their Brevitas equivalent; named_modules() is listed first
    # because the replacement changes the tree
    for name, wrapper in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _brevitas_layer(wrapper))
    # Brevitas's own constant buffers (bit widths, the unit scaling) are made on the CPU
    return model.to(model_device(qmodel)).eval()


def brevitas_layers(bmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the Brevitas quant layers of a :func:`to_brevitas` model, in module order
    (the same names and order as :meth:`QuantizedModel.quant_layers`)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return [(n, m) for n, m in bmodel.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)]


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Any]) -> torch.Tensor:
    """Concatenated logits of ``model`` over ``batches`` (images or ``(images, labels)``)."""
    outs = []
    device = model_device(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ACC_ZERO_POINT_WARNING)
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            outs.append(model(x.to(device)).float())
    return torch.cat(outs)


def cross_check(qmodel: QuantizedModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                bmodel: nn.Module | None = None, model: nn.Module | None = None) -> dict[str, Any]:
    """Workbench fake quantization vs Brevitas on the same labelled batches.

    Args:
        qmodel: from ``quantize_model(..., PTQConfig(quant_attn=False))``.
        batches: ``(images, labels)`` pairs (materialized once: every model sees the same ones).
        bmodel: the Brevitas model, if already built (default: ``to_brevitas(qmodel)``).
        model: the float model, optional: adds its accuracy and how far quantization moved the
            logits, the scale against which the Brevitas difference should look negligible.

    Returns:
        ``workbench`` and ``brevitas`` accuracies (percent), ``accuracy_gap`` (points, Brevitas
        minus workbench), ``prediction_agreement`` (percent of images with the same top-1 class),
        ``logit_max_abs_diff`` and ``logit_mean_abs_diff`` (workbench vs Brevitas), ``n`` images,
        the ``label`` (``W4A4`` ...); with ``model`` also ``fp`` (accuracy) and
        ``fp_logit_mean_abs_diff`` (float vs workbench).
    """
    batches = list(batches)
    bmodel = bmodel if bmodel is not None else to_brevitas(qmodel)
    labels = torch.cat([y for _, y in batches])
    ours, theirs = predict(qmodel.eval(), batches), predict(bmodel.eval(), batches)
    labels, n = labels.to(ours.device), int(labels.numel())
    pct = lambda hits: 100.0 * int(hits.sum()) / n  # noqa: E731  (integer counts: no float32 mean)
    acc_w, acc_b = pct(ours.argmax(1) == labels), pct(theirs.argmax(1) == labels)
    res: dict[str, Any] = {
        "label": qmodel.config.label, "n": n, "workbench": acc_w, "brevitas": acc_b, "accuracy_gap": acc_b - acc_w,
        "prediction_agreement": pct(ours.argmax(1) == theirs.argmax(1)),
        "logit_max_abs_diff": (ours - theirs).abs().max().item(),
        "logit_mean_abs_diff": (ours - theirs).abs().mean().item()}
    if model is not None:
        was_training = model.training
        fp = predict(model.eval(), batches)
        model.train(was_training)
        res.update(fp=pct(fp.argmax(1) == labels), fp_logit_mean_abs_diff=(fp - ours).abs().mean().item())
    return res


__all__ = ["INSTALL_HINT", "brevitas_layers", "check_comparable", "cross_check", "predict", "require_brevitas",
           "to_brevitas"]
