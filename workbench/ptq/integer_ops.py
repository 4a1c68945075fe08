"""The integer forms of the quantized ops, for the ONNX export (:mod:`workbench.ptq.onnx_export`).

Each is a ``torch.autograd.Function`` whose forward is the fake-quant computation and whose
``symbolic`` writes the integer ONNX graph (``QuantizeLinear`` codes, ``MatMulInteger`` /
``ConvInteger`` with int32 accumulation, one float rescale). The wrappers of
:mod:`workbench.ptq.modules` call them in export mode. Weight codes travel as uint8 with zero
point 128 (the module docstring of :mod:`workbench.ptq.onnx_export` says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..quant import fused_fake_quantize

if TYPE_CHECKING:  # annotations only: the wrappers import this module
    from .modules import ActQuantizer, QuantConv, QuantLayer, QuantLinear

_ONNX_FLOAT = 1  # TensorProto.FLOAT
#: Weight codes are exported as uint8 = int8 code + 128 (exact on every CPU, see above).
WEIGHT_ZERO_POINT = 128


def _const(g: Any, t: torch.Tensor) -> Any:
    return g.op("Constant", value_t=t)


def act_spec(aq: ActQuantizer) -> dict[str, Any]:
    """An activation quantizer's scale, zero point and range as plain tensors (made before tracing)."""
    return {"scale": aq.scale.detach().clone().float().reshape(()),
            "zp": aq.zero_point.detach().clone().to(torch.int32).reshape(()), "qmin": aq.qmin, "qmax": aq.qmax}


def _fq(x: torch.Tensor, a: dict[str, Any]) -> torch.Tensor:
    zp = int(a["zp"])
    return fused_fake_quantize(x, float(a["scale"]), float(a["qmin"] - zp), float(a["qmax"] - zp))


def _quantize_symbolic(g: Any, x: Any, a: dict[str, Any]) -> tuple[Any, Any]:
    """QuantizeLinear (+ Clip below 8 bits): float -> uint8 codes. Returns (codes, zero point)."""
    zp = _const(g, a["zp"].to(torch.uint8))
    xq = g.op("QuantizeLinear", x, _const(g, a["scale"]), zp)
    if a["qmax"] < 255:
        xq = g.op("Clip", xq, _const(g, torch.tensor(a["qmin"], dtype=torch.uint8)),
                  _const(g, torch.tensor(a["qmax"], dtype=torch.uint8)))
    return xq, zp


def _scale_symbolic(g: Any, acc: Any, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    y = g.op("Mul", g.op("Cast", acc, to_i=_ONNX_FLOAT), _const(g, scale))
    return y if bias is None else g.op("Add", y, _const(g, bias))


def _weight_zero_point(g: Any) -> Any:
    return _const(g, torch.tensor(WEIGHT_ZERO_POINT, dtype=torch.uint8))


def layer_spec(layer: QuantLayer) -> dict[str, Any]:
    """Plain tensors made *before* tracing: inside a traced autograd.Function only its own
    inputs and such constants may be used (module buffers would be traced values)."""
    a = act_spec(layer.input_quant)
    # symmetric int8 codes shifted to uint8 (zero point 128): see the module docstring
    codes = (layer.weight_codes().to(torch.int16) + WEIGHT_ZERO_POINT).to(torch.uint8)
    out_ch = codes.shape[0]
    bias = layer.layer.bias
    return {"a": a, "w_q": layer.weight_q.detach().clone(), "codes": codes,
            "scale": (a["scale"] * layer.w_step.detach().reshape(-1).expand(out_ch)).clone(),
            "bias": None if bias is None else bias.detach().clone()}


class _IntegerLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
        return F.linear(_fq(x, spec["a"]), spec["w_q"], spec["bias"])

    @staticmethod
    def symbolic(g: Any, x: Any, spec: dict[str, Any]) -> Any:
        xq, zp = _quantize_symbolic(g, x, spec["a"])
        w_codes = spec["codes"].t().contiguous()  # (in, out) for x @ W^T
        acc = g.op("MatMulInteger", xq, _const(g, w_codes), zp, _weight_zero_point(g))
        return _scale_symbolic(g, acc, spec["scale"], spec["bias"])


class _IntegerConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
        return spec["conv"]._conv_forward(_fq(x, spec["a"]), spec["w_q"], spec["bias"])

    @staticmethod
    def symbolic(g: Any, x: Any, spec: dict[str, Any]) -> Any:
        conv = spec["conv"]
        xq, zp = _quantize_symbolic(g, x, spec["a"])
        w_codes = spec["codes"]
        acc = g.op("ConvInteger", xq, _const(g, w_codes), zp, _weight_zero_point(g),
                   strides_i=list(conv.stride), pads_i=list(conv.padding) * 2,  # ONNX: all begins, all ends
                   dilations_i=list(conv.dilation), group_i=conv.groups, kernel_shape_i=list(conv.kernel_size))
        shape = [1, -1] + [1] * (w_codes.dim() - 2)
        bias = None if spec["bias"] is None else spec["bias"].reshape(shape)
        return _scale_symbolic(g, acc, spec["scale"].reshape(shape), bias)


class _IntegerMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
        return (_fq(a, spec["a"]) @ _fq(b, spec["b"])) * spec["extra"]

    @staticmethod
    def symbolic(g: Any, a: Any, b: Any, spec: dict[str, Any]) -> Any:
        aq, azp = _quantize_symbolic(g, a, spec["a"])
        bq, bzp = _quantize_symbolic(g, b, spec["b"])
        acc = g.op("MatMulInteger", aq, bq, azp, bzp)
        # the attention scale head_dim**-0.5 folds into the output scale
        return _scale_symbolic(g, acc, spec["a"]["scale"] * spec["b"]["scale"] * spec["extra"], None)


def integer_linear(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Export-mode forward of a QuantLinear (emits MatMulInteger when traced for ONNX)."""
    return _IntegerLinear.apply(x, layer._export_spec)


def integer_conv(layer: QuantConv, x: torch.Tensor) -> torch.Tensor:
    """Export-mode forward of a QuantConv (emits ConvInteger when traced for ONNX)."""
    return _IntegerConv.apply(x, layer._export_spec)


def integer_matmul(a: torch.Tensor, b: torch.Tensor, a_quant: ActQuantizer, b_quant: ActQuantizer,
                   extra_scale: float) -> torch.Tensor:
    """Export-mode ``extra_scale * (Q(a) @ Q(b))`` (emits MatMulInteger on two activation codes)."""
    return _IntegerMatMul.apply(a, b, a_quant._export_spec)
