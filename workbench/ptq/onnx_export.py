"""A real integer path: export a quantized copy to ONNX and run it in ONNX Runtime.

Why ONNX Runtime: it installs from PyPI on any CPU (``pip install onnx onnxruntime``, the
``onnx`` extra), and its CPU kernels ``MatMulInteger`` and ``ConvInteger`` multiply uint8
activation codes by weight codes with int32 accumulation (MLAS integer GEMM), which is
exactly the integer computation the fake quantizer claims to simulate. torch.ao's int8
backends are deprecated and x86-only; torchao/optimum-quanto stop at int8 activations and
do not run arbitrary per-layer graphs as directly.

The exported graph spells out each quantized layer instead of relying on the runtime's
QDQ fusion heuristics (which leave Conv in float when no output quantizer follows)::

    x_q  = QuantizeLinear(x, s_x, zp_x)            # uint8 codes, round half to even
    x_q  = Clip(x_q, 0, 2^b - 1)                   # only when b < 8
    acc  = MatMulInteger / ConvInteger(x_q, W_q + 128, zp_x, 128)   # int32
    y    = Cast(acc, float) * (s_x * s_w[channel]) + bias

The symmetric int8 weight codes travel as uint8 with zero point 128: the same integers, but the
runtime then takes its uint8 x uint8 kernel. Its uint8 x int8 kernel on x86 CPUs without VNNI
(AVX2) adds pairs of products in int16 with saturation (``vpmaddubsw``), so full-range codes
(255 x 127 x 2 > 32767) come out wrong by up to 10^5 per output; uint8 x uint8 widens first and
is exact on every CPU (tests/test_ptq.py checks the integers against an int64 matmul).

Attention matmuls are the same with two activation codes (``q @ k^T`` and ``softmax @ v``).
Everything else (LayerNorm, BatchNorm, softmax, GELU, residuals) runs in float in ONNX Runtime
too, as in the fake-quant model. Requirements: weights and activations both quantized with at
most 8 bits, asymmetric activations, uniform softmax quantizer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MissingDependencyError, ModelError
from .engine import QuantizedModel
from .modules import ActQuantizer, QuantAttention, QuantConv, QuantLinear, _QuantLayer, fused_fake_quantize

logger = logging.getLogger(__name__)

_ONNX_FLOAT = 1  # TensorProto.FLOAT
#: Weight codes are exported as uint8 = int8 code + 128 (exact on every CPU, see above).
WEIGHT_ZERO_POINT = 128


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is not installed: install the 'onnx' extra (pip install 'flatquant-workbench[onnx]')"
        ) from None


def _const(g: Any, t: torch.Tensor) -> Any:
    return g.op("Constant", value_t=t)


def _act_spec(aq: ActQuantizer) -> dict[str, Any]:
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


def _layer_spec(layer: _QuantLayer) -> dict[str, Any]:
    """Plain tensors made *before* tracing: inside a traced autograd.Function only its own
    inputs and such constants may be used (module buffers would be traced values)."""
    a = _act_spec(layer.input_quant)
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


def check_exportable(qmodel: QuantizedModel) -> None:
    """Raise ConfigError/ModelError unless every quantized op has an integer ONNX form."""
    cfg = qmodel.config
    if cfg.w_bits is None or cfg.a_bits is None or cfg.w_bits > 8 or cfg.a_bits > 8:
        raise ConfigError(f"integer export needs weights and activations at 2..8 bits, not {cfg.label}")
    if cfg.a_symmetric:
        raise ConfigError("integer export supports asymmetric (uint8) activations only")
    for name, m in qmodel.model.named_modules():
        if isinstance(m, ActQuantizer) and m.scheme != "uniform":
            raise ConfigError(f"{name}: the log2 softmax quantizer has no ONNX integer form; use 'uniform'")
        if isinstance(m, ActQuantizer) and m.mode != "quant":
            raise ConfigError(f"{name}: this quantizer is not calibrated, so it cannot be exported")
        if isinstance(m, QuantConv):
            conv = m.layer
            if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
                raise ModelError(f"{name}: only explicit zero padding is exportable")


@contextlib.contextmanager
def _export_mode(qmodel: QuantizedModel) -> Iterator[None]:
    mods = [m for m in qmodel.modules() if isinstance(m, (_QuantLayer, QuantAttention))]
    for m in mods:
        if isinstance(m, QuantAttention):
            # one spec per matmul, hung on its first operand's quantizer
            m.q_quant._export_spec = {"a": _act_spec(m.q_quant), "b": _act_spec(m.k_quant), "extra": float(m.scale)}
            m.softmax_quant._export_spec = {"a": _act_spec(m.softmax_quant), "b": _act_spec(m.v_quant),
                                            "extra": 1.0}
            m._export_spec = None
        else:
            m._export_spec = _layer_spec(m)
            if isinstance(m, QuantConv):
                m._export_spec["conv"] = m.layer
        m.export_mode = True
    try:
        yield
    finally:
        for m in mods:
            m.export_mode = False
            del m._export_spec
            if isinstance(m, QuantAttention):
                del m.q_quant._export_spec, m.softmax_quant._export_spec


def export_onnx(qmodel: QuantizedModel, path: str | Path, example_input: torch.Tensor,
                opset: int = 13) -> Path:
    """Write ``qmodel`` as an ONNX graph of integer ops (see the module docstring).

    Args:
        qmodel: result of :func:`~workbench.ptq.quantize_model` (W<=8, A<=8, asymmetric).
        path: output ``.onnx`` file.
        example_input: one input batch (any batch size: the batch axis is exported as dynamic).

    Raises:
        MissingDependencyError: onnx is not installed.
        ConfigError / ModelError: the model has a quantizer with no integer ONNX form.
    """
    _require("onnx")
    check_exportable(qmodel)
    path = Path(path)
    qmodel = copy.deepcopy(qmodel).cpu().eval()  # the caller's copy keeps its device and mode
    with _export_mode(qmodel), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation/tracer chatter
        # the TorchScript-based exporter honours autograd.Function.symbolic, which lets each
        # layer spell out its integer ops; the dynamo exporter would need onnxscript
        torch.onnx.export(qmodel, (example_input.cpu(),), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU inference session for ``path``."""
    ort = _require("onnxruntime")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_evaluate(path: str | Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  threads: int | None = None) -> dict[str, float]:
    """Loss and accuracy (percent) of an exported model run by ONNX Runtime, like ``train.evaluate``."""
    sess = onnx_session(path, threads)
    total, correct, n = 0.0, 0, 0
    for x, y in batches:
        logits = torch.from_numpy(sess.run(["logits"], {"images": x.cpu().numpy()})[0])
        total += F.cross_entropy(logits, y.cpu(), reduction="sum").item()
        correct += (logits.argmax(1) == y.cpu()).sum().item()
        n += len(y)
    if n == 0:
        raise ConfigError("onnx_evaluate got no batches")
    return {"loss": total / n, "accuracy": 100.0 * correct / n, "n": n}


def integer_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each integer op type the exported graph has (the proof of the integer path)."""
    onnx = _require("onnx")
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {k: v for k, v in sorted(ops.items()) if "Integer" in k or k in ("QuantizeLinear", "Clip")}


def cross_check(model: nn.Module, qmodel: QuantizedModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                path: str | Path) -> dict[str, Any]:
    """Fake-quant vs ONNX Runtime integer accuracy on the same batches (``model`` gives the FP row).

    Returns:
        ``fp``, ``fake_quant`` and ``onnx_integer`` metric dicts, ``accuracy_gap`` (points,
        ONNX minus fake quant), ``logit_max_abs_diff`` and the integer ``ops`` counts.
    """
    from ..train import evaluate

    batches = list(batches)
    export_onnx(qmodel, path, batches[0][0][:2])
    with torch.no_grad():
        fp = evaluate(model, batches, "cpu")
        fq = evaluate(qmodel, batches, "cpu")
        sess = onnx_session(path)
        x = batches[0][0]
        diff = (torch.from_numpy(sess.run(["logits"], {"images": x.numpy()})[0]) - qmodel(x)).abs().max().item()
    ox = onnx_evaluate(path, batches)
    return {"fp": fp, "fake_quant": fq, "onnx_integer": ox, "accuracy_gap": ox["accuracy"] - fq["accuracy"],
            "logit_max_abs_diff": diff, "ops": integer_op_counts(path)}


__all__ = ["check_exportable", "cross_check", "export_onnx", "integer_op_counts", "onnx_evaluate", "onnx_session"]
