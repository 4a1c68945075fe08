"""RepQ-ViT-style reparameterization of post-LayerNorm activations (Li et al., ICCV 2023).

The inputs of a ViT block's ``qkv`` and ``fc1`` layers are LayerNorm outputs, whose channels
have very different ranges: one per-tensor step is far too coarse for most channels. RepQ-ViT
calibrates them *per channel* (step ``s_c``, zero point ``z_c``), then moves that per-channel
quantizer into the model so that a per-tensor one does the same work. With
``s~ = mean(s_c)``, ``z~ = round(mean(z_c))``, ``r1 = s / s~`` and ``r2 = z - z~``:

* LayerNorm affine: ``gamma' = gamma / r1``, ``beta' = (beta + s * r2) / r1``, so its output is
  ``x'_c = (x_c + s_c r2_c) / r1_c`` and ``x'_c / s~ = x_c / s_c + r2_c``;
* the per-tensor quantizer ``(s~, z~)`` on ``x'`` then produces the same integer codes as the
  per-channel ``(s_c, z_c)`` on ``x``, and dequantizes to ``(x^_c + s_c r2_c) / r1_c``;
* the next layer undoes that affine map: ``W' = W * r1`` (per input column) and
  ``b' = b - W (s * r2)``.

So the reparameterized model with per-tensor input quantizers computes exactly what the
original model with per-channel ones computes (up to float rounding), and in full precision
exactly what the original computes. The weights are quantized *after* the change (``W'``),
as in RepQ-ViT. The per-channel ranges are min-max ranges over the calibration images.
What this module does not do: RepQ-ViT's log-sqrt(2) softmax quantizer (the workbench offers
``softmax_quantizer='log2'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import quant
from .modules import ActQuantizer, QuantLayer


def layernorm_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, QuantLayer]]:
    """``(name, LayerNorm, quantized layer)`` for every LayerNorm whose output feeds only that layer.

    In a timm ViT ``Block``: ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1``. Pairs whose layer has
    no activation quantizer (activations in float) are left out: there is nothing to reparameterize.
    """
    pairs = []
    for name, m in model.named_modules():
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        for norm_name, layer in (("norm1", getattr(attn, "qkv", None)), ("norm2", getattr(mlp, "fc1", None))):
            norm = getattr(m, norm_name, None)
            if (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and isinstance(layer, QuantLayer)
                    and isinstance(layer.input_quant, ActQuantizer) and layer.input_quant.scheme == "uniform"):
                pairs.append((f"{name}.{norm_name}" if name else norm_name, norm, layer))
    return pairs


def has_layernorm_pairs(model: nn.Module) -> bool:
    """Whether a float model has a LayerNorm -> Linear pair that :func:`layernorm_pairs` would find."""
    return any(isinstance(getattr(m, "norm1", None), nn.LayerNorm)
               and isinstance(getattr(getattr(m, "attn", None), "qkv", None), nn.Linear) for m in model.modules())


class ChannelRange:
    """Per-channel min and max of a layer's input (last dimension = channels), as a pre-hook."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, _m: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        lo, hi = x.amin(0), x.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


@torch.no_grad()
def reparameterize(norm: nn.LayerNorm, layer: QuantLayer, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, Any]:
    """Fold the per-channel quantizer of ``[lo, hi]`` into ``norm`` and ``layer.layer``; set the
    layer's input quantizer to the per-tensor ``(s~, z~)`` and switch it to quantizing.

    The caller re-quantizes the layer's weight afterwards (its float weight has changed).
    """
    q = layer.input_quant
    qp = quant.activation_qparams(lo.float(), hi.float(), q.bits, symmetric=q.symmetric)  # per channel
    s, z = qp.step.double(), qp.zero_point.double()
    s_t = s.mean().to(q.scale.dtype).double()  # the value the quantizer will store: fold exactly that one
    z_t = torch.round(z.mean())
    r1, r2 = s / s_t, z - z_t
    dt = norm.weight.dtype
    norm.weight.copy_((norm.weight.double() / r1).to(dt))
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(s)
    new_beta = ((beta + s * r2) / r1).to(dt)
    if norm.bias is None:
        norm.bias = nn.Parameter(new_beta, requires_grad=False)
    else:
        norm.bias.copy_(new_beta)
    fp = layer.layer
    w = fp.weight.double()
    shift = w @ (s * r2)  # what the shifted inputs add to every output: taken off the bias
    fp.weight.copy_((w * r1).to(fp.weight.dtype))
    if fp.bias is None:
        fp.bias = nn.Parameter((-shift).to(fp.weight.dtype), requires_grad=False)
    else:
        fp.bias.copy_((fp.bias.double() - shift).to(fp.bias.dtype))
    q.scale.copy_(s_t.float().reshape(()))
    q.zero_point.copy_(z_t.to(torch.int32).reshape(()))
    q.observer = None
    q.mode = "quant"
    q.sync_numbers()
    return {"channels": int(s.numel()), "step_ratio_max": float(r1.max()), "step_ratio_min": float(r1.min())}


@torch.no_grad()
def observe_channel_ranges(model: nn.Module, pairs: Sequence[tuple[str, nn.LayerNorm, QuantLayer]],
                           run: Any) -> list[ChannelRange]:
    """Call ``run()`` (a calibration pass) with per-channel range hooks on the pairs' layers."""
    ranges = [ChannelRange() for _ in pairs]
    handles = [layer.register_forward_pre_hook(r) for (_, _, layer), r in zip(pairs, ranges)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return ranges
