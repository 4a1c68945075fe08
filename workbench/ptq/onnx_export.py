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
from .integer_ops import act_spec, layer_spec
from .modules import ActQuantizer, QuantAttention, QuantConv, QuantLayer

logger = logging.getLogger(__name__)

def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is not installed: install the 'onnx' extra (pip install 'flatquant-workbench[onnx]')"
        ) from None


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
    mods = [m for m in qmodel.modules() if isinstance(m, (QuantLayer, QuantAttention))]
    for m in mods:
        if isinstance(m, QuantAttention):
            # one spec per matmul, hung on its first operand's quantizer
            m.q_quant._export_spec = {"a": act_spec(m.q_quant), "b": act_spec(m.k_quant), "extra": float(m.scale)}
            m.softmax_quant._export_spec = {"a": act_spec(m.softmax_quant), "b": act_spec(m.v_quant),
                                            "extra": 1.0}
            m._export_spec = None
        else:
            m._export_spec = layer_spec(m)
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
