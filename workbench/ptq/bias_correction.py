"""Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019, section 4.2): quantization shifts the *mean* output of a layer,
and the next layers (LayerNorm excepted) pass that shift on. Each quantized Linear/Conv gets, per
output channel, the mean of its full-precision output minus the mean of its quantized output on
the calibration images added to its bias.

The layers are corrected one after the other, in the order of the model, and each quantized mean
is measured with every earlier layer already corrected, so a layer also absorbs the shift its
quantized inputs carry (weight and activation rounding both). The full-precision means are
measured once, on the original model. Biases stay in floating point, as every bias does here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .modules import QuantLayer


def _channel_mean(out: torch.Tensor, conv: bool) -> torch.Tensor:
    """Per-output-channel mean over every other dimension, in float64 (a sum over many values)."""
    out = out.detach().double()
    if conv:
        return out.transpose(0, 1).reshape(out.shape[1], -1).mean(dim=1)
    return out.reshape(-1, out.shape[-1]).mean(dim=0)


@torch.no_grad()
def _output_means(model: nn.Module, layers: dict[str, nn.Module], images: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean output per channel of each named layer over ``images`` (one pass of the model)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, layer in layers.items():
        conv = isinstance(getattr(layer, "layer", layer), nn.modules.conv._ConvNd)

        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor, name: str = name, conv: bool = conv) -> None:
            n = out.numel() // out.shape[1 if conv else -1]
            sums[name] = sums.get(name, 0) + _channel_mean(out, conv) * n
            counts[name] = counts.get(name, 0) + n

        handles.append(layer.register_forward_hook(hook))
    try:
        for x in images:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


@torch.no_grad()
def correct_biases(qmodel: nn.Module, fp_model: nn.Module, images: Sequence[torch.Tensor]) -> list[dict]:
    """Add to each quantized layer's bias the shift of its mean output on ``images``.

    ``qmodel`` is the calibrated quantized copy (changed in place), ``fp_model`` the model it was
    made from (same module names). Layers the images never reach are left alone.

    Returns:
        One row per corrected layer: name, output channels, and the largest |shift| applied.
    """
    qlayers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    fp_means = _output_means(fp_model, {n: fp_model.get_submodule(n) for n in qlayers}, images)
    rows = []
    for name, qlayer in qlayers.items():
        if name not in fp_means:
            continue
        q_mean = _output_means(qmodel, {name: qlayer}, images)[name]
        shift = (fp_means[name] - q_mean).to(qlayer.layer.weight.dtype)
        layer = qlayer.layer
        if layer.bias is None:  # a bias-free layer gets a bias that holds only the correction
            layer.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=False)
        layer.bias.add_(shift.to(layer.bias.device))
        rows.append({"layer": name, "channels": int(shift.numel()), "max_abs_shift": float(shift.abs().max())})
    return rows
