"""Post-training quantization: config, conversion and the inspectable quantized copy.

The recipe of :func:`quantize_model`:

1. deep-copy the model (the original is never touched);
2. replace timm ``Attention`` blocks by :class:`QuantAttention` (if attention quantization is on);
3. replace every Linear/Conv by a wrapper whose weight is quantized right away;
4. run ``n_calib`` calibration images through the copy while observers record input ranges;
5. freeze the observed ranges into scales/zero points and switch to quantizing.

Options of :class:`PTQConfig` that go beyond round-to-nearest, applied in this order:

* ``repq``: post-LayerNorm inputs calibrated per channel and folded into the LayerNorm and the
  next layer (RepQ-ViT, :mod:`workbench.ptq.reparam`), between steps 4 and 5;
* ``reconstruction``: learned rounding, ``adaround`` per layer or ``brecq`` per block with
  learned activation steps and optional ``qdrop`` (:mod:`workbench.ptq.reconstruction`);
* ``bias_correction``: each layer's mean output shift added to its bias
  (:mod:`workbench.ptq.bias_correction`).

What is quantized: Linear/Conv weights (symmetric, per output channel or per tensor) and
Linear/Conv inputs (per tensor), plus, in ViTs, the inputs of both attention matmuls (q, k, v
and the softmax output). What stays floating point: LayerNorm/BatchNorm, softmax, GELU and
other activation functions, residual additions, biases, position embeddings and the model
output. This is the usual "fake quantization" protocol of the ViT PTQ literature; real
integer kernels would also need integer versions of those operations.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import quant
from ..config import ConfigBase
from ..errors import ConfigError, DataError, UnknownNameError, WorkbenchWarning
from ..runinfo import model_device
from .modules import ActQuantizer, QuantAttention, QuantConv, QuantLayer, QuantLinear
from .observers import OBSERVERS, make_observer

logger = logging.getLogger(__name__)

#: Written into every result's metadata so nobody mistakes fake quantization for an integer model.
FLOAT_OPS = ("LayerNorm", "BatchNorm (not folded)", "softmax", "GELU and other activation functions",
             "residual additions", "biases", "position embeddings and class token", "model output (logits)")
SOFTMAX_SCHEMES = ("uniform", "log2")


@dataclass(frozen=True)
class PTQConfig(ConfigBase):
    """One post-training quantization setting. ``None`` bits mean 'not quantized' (32-bit float)."""

    KIND: ClassVar[str] = "PTQConfig field"

    w_bits: int | None = 8  # weight bits, 2..16
    a_bits: int | None = 8  # activation bits, 2..16
    w_per_channel: bool = True  # one scale per output channel: the standard for weights
    a_symmetric: bool = False  # asymmetric uses the whole grid for one-sided tensors (post-GELU/ReLU)
    observer: str = "minmax"  # activation range observer: minmax | percentile | mse
    w_observer: str | None = None  # weight clipping observer; None = same as `observer`
    percentile: float = 99.99  # percentile observer's upper percentile
    mse_grid: int = 50  # shrink factors tried by the mse observer
    n_calib: int = 256  # calibration images
    quant_attn: bool = True  # also quantize the attention matmul inputs (q, k, v, softmax)
    softmax_quantizer: str = "uniform"  # uniform | log2 (softmax output, if quant_attn)
    first_last_8bit: bool = False  # keep the first and last Linear/Conv at (at least) 8 bits
    bias_correction: bool = False  # add each layer's mean output shift on the calibration set to its bias
    reconstruction: str = "none"  # learned rounding: none (to nearest) | adaround (per layer) | brecq (per block)
    qdrop: float = 0.0  # brecq only: probability of leaving an activation in float while reconstructing (QDrop: 0.5)
    recon_iters: int = 500  # optimizer steps per reconstructed layer or block
    repq: bool = False  # calibrate post-LayerNorm inputs per channel, fold the scales into LayerNorm (RepQ-ViT)
    sample_size: int = 2**18  # values kept per tensor by percentile/mse observers
    seed: int = 0  # seed of the observers' subsampling
    # mixed precision: weight bits per Linear/Conv (module name -> bits, e.g. from ptq.allocate_bits);
    # the layers it names override w_bits. Stored as sorted (name, bits) pairs so the config stays hashable.
    layer_bits: tuple[tuple[str, int], ...] = ()
    # the same for the input (activation) quantizer of each Linear/Conv; the layers it names override
    # a_bits there. The attention matmul inputs keep a_bits.
    layer_a_bits: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for name, what in (("layer_bits", "weight"), ("layer_a_bits", "input activation")):
            value = getattr(self, name)
            pairs = value.items() if isinstance(value, dict) else value
            try:
                pairs = tuple(sorted((str(k), quant.check_bits(v, f"{name}[{k!r}]")) for k, v in pairs))
            except ConfigError:
                raise
            except (TypeError, ValueError):
                raise ConfigError(f"{name} maps layer names to {what} bits, got {value!r}") from None
            object.__setattr__(self, name, pairs)
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, quant.check_bits(v, name))
        for name in ("observer", "w_observer"):
            v = getattr(self, name)
            if v is not None and v not in OBSERVERS:
                raise UnknownNameError(OBSERVERS.unknown_message(v))
        if self.softmax_quantizer not in SOFTMAX_SCHEMES:
            raise ConfigError(f"softmax_quantizer must be one of {SOFTMAX_SCHEMES}, got {self.softmax_quantizer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        for name in ("n_calib", "mse_grid", "sample_size", "recon_iters"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        from .reconstruction import RECONSTRUCTIONS

        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}")
        if not 0.0 <= float(self.qdrop) < 1.0:
            raise ConfigError(f"qdrop is a probability in [0, 1) (QDrop uses 0.5), got {self.qdrop}")
        if self.qdrop and self.reconstruction != "brecq":
            raise ConfigError("qdrop drops activation quantization during block reconstruction: "
                              "set reconstruction='brecq' too")
        if self.reconstruction == "adaround" and self.w_bits is None:
            raise ConfigError("AdaRound learns how to round weights, but w_bits is None (weights in float): "
                              "set w_bits or reconstruction='none'")

    @property
    def label(self) -> str:
        """``'W4A8'`` style name; 32 stands for a tensor kind left in floating point. Mixed
        precision: ``'Wmix(4)A8'`` (``'Amix(8)'`` for activations), with the bits of the layers the
        map does not name."""
        w = f"mix({self.w_bits or 32})" if self.layer_bits else f"{self.w_bits or 32}"
        a = f"mix({self.a_bits or 32})" if self.layer_a_bits else f"{self.a_bits or 32}"
        return f"W{w}A{a}"

    @property
    def method(self) -> str:
        """The PTQ method beyond the observer's ranges, e.g. ``rtn``, ``rtn+bc``, ``adaround``,
        ``brecq``, ``qdrop``, ``repq+rtn``: reparameterization, rounding, then bias correction."""
        rounding = {"none": "rtn", "adaround": "adaround", "brecq": "qdrop" if self.qdrop else "brecq"}
        parts = (["repq"] if self.repq else []) + [rounding[self.reconstruction]]
        return "+".join(parts + (["bc"] if self.bias_correction else []))

    @property
    def weight_observer(self) -> str:
        return self.w_observer or self.observer


def not_applicable(config: PTQConfig, model: nn.Module) -> str | None:
    """Why ``config`` cannot quantize ``model`` (a sentence), or ``None`` when it can.

    For callers that try many methods on many architectures (notebooks, sweeps) and would
    rather skip a method that does not apply than stop: ``repq`` needs LayerNorm -> Linear pairs
    (ViT blocks) and ``brecq`` needs blocks it knows. :func:`quantize_model` raises the same
    reasons as errors.
    """
    from .reconstruction import has_known_blocks
    from .reparam import has_layernorm_pairs

    name = type(model).__name__
    if config.repq and config.a_bits is not None and not has_layernorm_pairs(model):
        return f"repq needs LayerNorm -> Linear pairs (ViT blocks); {name} has none"
    if config.reconstruction == "brecq" and not has_known_blocks(model):
        return f"brecq needs blocks it knows (timm ViT Block, ResNet BasicBlock/Bottleneck); {name} has none"
    return None


def _bits_for(bits: int | None, boundary: bool, config: PTQConfig) -> int | None:
    if bits is None or not (boundary and config.first_last_8bit):
        return bits
    return max(bits, 8)


def _observer(config: PTQConfig, name: str):
    return make_observer(name, percentile=config.percentile, mse_grid=config.mse_grid,
                         sample_size=config.sample_size, n_calib=config.n_calib, seed=config.seed)


def _set_child(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _timm_attention_types() -> tuple[type, ...]:
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # timm missing: no ViT attention to handle
        return ()
    return (Attention,)


def _act_quantizer(config: PTQConfig, label: str) -> ActQuantizer:
    return ActQuantizer(config.a_bits, config.a_symmetric, _observer(config, config.observer), label=label)


def _replace_attention(model: nn.Module, config: PTQConfig) -> int:
    types = _timm_attention_types()
    targets = [n for n, m in model.named_modules() if types and type(m) in types]
    for name in targets:
        attn = model.get_submodule(name)
        a = config.a_bits
        if config.softmax_quantizer == "log2":
            sm = ActQuantizer(a, False, None, scheme="log2", label="softmax")
        else:
            # softmax outputs lie in [0, 1]: an asymmetric grid with zero point 0 fits them
            sm = ActQuantizer(a, False, _observer(config, config.observer), label="softmax")
        _set_child(model, name, QuantAttention(attn, _act_quantizer(config, "q"), _act_quantizer(config, "k"),
                                               _act_quantizer(config, "v"), sm))
    return len(targets)


def _replace_layers(model: nn.Module, config: PTQConfig) -> int:
    inside_wrapper: set[str] = set()
    targets = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_wrapper):
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            targets.append(name)
            inside_wrapper.add(name)
    per_layer, per_layer_a = dict(config.layer_bits), dict(config.layer_a_bits)
    for field_name, named in (("layer_bits", per_layer), ("layer_a_bits", per_layer_a)):
        unknown = sorted(set(named) - set(targets))
        if unknown:
            raise ConfigError(f"{field_name} names {unknown[:3]}, which are not Linear/Conv layers of this model "
                              f"(those are e.g. {targets[:3]})")
    if per_layer_a and config.a_bits is None:
        raise ConfigError("layer_a_bits sets input widths, but a_bits is None (activations in float): set a_bits "
                          "for the layers the map does not name and for the attention matmuls")
    for i, name in enumerate(targets):
        layer = model.get_submodule(name)
        boundary = i in (0, len(targets) - 1)
        w_bits = _bits_for(per_layer.get(name, config.w_bits), boundary, config)
        a_bits = _bits_for(per_layer_a.get(name, config.a_bits), boundary, config)
        w_obs = _observer(config, config.weight_observer) if w_bits is not None else None
        a_q = (ActQuantizer(a_bits, config.a_symmetric, _observer(config, config.observer))
               if a_bits is not None else None)
        cls = QuantLinear if isinstance(layer, nn.Linear) else QuantConv
        _set_child(model, name, cls(layer, w_bits, config.w_per_channel, w_obs, a_q))
    return len(targets)


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _take(batches: Iterable[Any] | None, n: int) -> list[Any]:
    """The first ``n`` images of ``batches`` (tensors or ``(images, labels)``) as a list of image tensors."""
    out, seen = [], 0
    for batch in batches if batches is not None else ():
        x = _images(batch)[: n - seen]
        if x.shape[0]:
            out.append(x)
            seen += x.shape[0]
        if seen >= n:
            break
    return out


class QuantizedModel(nn.Module):
    """The quantized copy: a module like the original, plus a description of what was done.

    Attributes:
        model: the converted deep copy (Linear/Conv replaced by QuantLinear/QuantConv, ...).
        config: the :class:`PTQConfig` used.
        calib_images: number of calibration images actually seen.
        calib_time_s: seconds spent converting and calibrating.
    """

    def __init__(self, model: nn.Module, config: PTQConfig, calib_images: int, calib_time_s: float,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.calib_images = calib_images
        self.calib_time_s = calib_time_s
        self.details = details or {}  # what RepQ, reconstruction and bias correction did, per layer/unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def quant_layers(self) -> list[tuple[str, QuantLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, QuantLayer)]

    def describe(self) -> list[dict[str, Any]]:
        """One tidy row per quantized tensor: name, tensor, bits, granularity, scheme, observer, step, range."""
        rows: list[dict[str, Any]] = []
        for name, m in self.model.named_modules():
            if isinstance(m, QuantLayer):
                qp = m.weight_qparams()
                if qp is not None:
                    step = qp.step.flatten()
                    rows.append(dict(name=name, tensor="weight", bits=qp.bits,
                                     granularity="per-channel" if m.per_channel else "per-tensor",
                                     scheme="symmetric", observer=m.w_observer_name,
                                     step=float(step.median()), step_min=float(step.min()),
                                     step_max=float(step.max()), lo=float(-(qp.qmax * step).max()),
                                     hi=float((qp.qmax * step).max()), zero_point=0))
            if isinstance(m, ActQuantizer):
                owner = name.rsplit(".", 1)[0]
                if m.scheme == "log2":
                    rows.append(dict(name=owner, tensor=m.label, bits=m.bits, granularity="per-tensor",
                                     scheme="log2", observer=None, step=None, step_min=None, step_max=None,
                                     lo=0.0, hi=1.0, zero_point=None))
                    continue
                qp = m.qparams()
                s = float(qp.step)
                rows.append(dict(name=owner, tensor=m.label, bits=m.bits, granularity="per-tensor",
                                 scheme="symmetric" if m.symmetric else "asymmetric",
                                 observer=self.config.observer, step=s, step_min=s, step_max=s,
                                 lo=float(qp.lower()), hi=float(qp.upper()), zero_point=int(m.zero_point)))
        return rows

    def summary(self) -> str:
        """``describe()`` as a fixed-width text table, followed by what stays in floating point."""
        rows = self.describe()
        head = f"{'layer':<28} {'tensor':<8} {'bits':>4} {'granularity':<12} {'scheme':<10} {'observer':<10} {'step':>10}"
        lines = [f"{self.config.label} quantized copy, {self.calib_images} calibration images", head]
        for r in rows:
            step = "-" if r["step"] is None else f"{r['step']:.3g}"
            lines.append(f"{r['name'][:28]:<28} {r['tensor']:<8} {r['bits']:>4} {r['granularity']:<12} "
                         f"{r['scheme']:<10} {str(r['observer']):<10} {step:>10}")
        lines.append("floating point (not quantized): " + ", ".join(FLOAT_OPS))
        return "\n".join(lines)

    def metadata(self) -> dict[str, Any]:
        """Plain-dict record of the conversion, safe to store next to results."""
        rows = self.describe()
        quantized = sorted({f"{r['tensor']}" for r in rows})
        return {
            "config": self.config.to_dict(),
            "label": self.config.label,
            "quantized_tensors": quantized,
            "n_quantized_layers": len(self.quant_layers()),
            "n_quantizers": len(rows),
            "float_ops": list(FLOAT_OPS),
            "note": ("fake quantization (quantize-dequantize in float32): LayerNorm, softmax and GELU "
                     "arithmetic stay in floating point; only the listed tensors are rounded to the grid"),
            "calib_images": self.calib_images,
            "calib_time_s": self.calib_time_s,
            "method": self.config.method,
            **self.details,
        }


@torch.no_grad()
def quantize_model(model: nn.Module, config: PTQConfig | None = None,
                   calib_batches: Iterable[Any] | None = None, *, device: torch.device | str | None = None,
                   progress: bool = False) -> QuantizedModel:
    """Return a fake-quantized copy of ``model``; ``model`` itself is never modified.

    Args:
        model: any module; Linear/Conv layers and timm ViT ``Attention`` blocks are handled.
        config: the setting (default: W8A8, per-channel weights, min-max observers).
        calib_batches: iterable of image tensors or ``(images, labels)`` pairs; the first
            ``config.n_calib`` images are used. Not needed when activations stay in float.
        device: where to calibrate (default: the model's device).
        progress: show a progress bar over the reconstructed units (learned rounding only).

    Returns:
        A :class:`QuantizedModel` in eval mode.

    Raises:
        ConfigError: invalid config.
        DataError: activations are to be quantized but the calibration set is empty.
    """
    config = config or PTQConfig()
    if not isinstance(config, PTQConfig):
        raise ConfigError(f"config must be a PTQConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else model_device(model)
    qmodel = copy.deepcopy(model).to(device).eval()
    n_attn = _replace_attention(qmodel, config) if (config.quant_attn and config.a_bits is not None) else 0
    n_layers = _replace_layers(qmodel, config)
    if n_layers == 0:
        logger.warning("model has no Linear/Conv layer: nothing to quantize")
    quantizers = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    learned = config.reconstruction != "none"
    observing = any(q.mode == "observe" for q in quantizers)
    # the calibration images, read once (an iterator would be spent) and reused by every step below
    images = ([x.to(device) for x in _take(calib_batches, config.n_calib)]
              if observing or config.bias_correction or learned else [])
    seen = sum(int(x.shape[0]) for x in images)
    pairs = []
    if config.repq and config.a_bits is not None:
        from .reparam import layernorm_pairs

        pairs = layernorm_pairs(qmodel)
        if not pairs:
            raise ConfigError(f"repq reparameterizes LayerNorm -> Linear pairs (timm ViT blocks); "
                              f"{type(model).__name__} has none. Leave repq off for this model")

    def calibrate() -> None:
        for x in images:
            qmodel(x)

    details: dict[str, Any] = {}
    if observing:
        if pairs:
            from .reparam import observe_channel_ranges

            ranges = observe_channel_ranges(qmodel, pairs, calibrate)
        else:
            calibrate()
        if seen == 0:
            raise DataError(
                f"the calibration set is empty: {config.label} quantizes activations, so quantize_model "
                "needs calibration images (pass calib_batches with at least one image)")
        if pairs:
            from .reparam import reparameterize

            details["repq"] = []
            for (name, norm, layer), r in zip(pairs, ranges):
                row = reparameterize(norm, layer, r.lo, r.hi)
                if layer.w_bits is not None:  # its float weight changed: quantize the new one
                    layer.quantize_weight(_observer(config, config.weight_observer))
                details["repq"].append({"layernorm": name, **row})
        for q in quantizers:
            if q.mode != "observe":  # log2 softmax, or set by the reparameterization
                continue
            if q.observer is not None and q.observer.min is None:
                # a branch the calibration data never reached: leave it in float, loudly
                warnings.warn(f"a {q.label} quantizer saw no calibration data and stays unquantized",
                              WorkbenchWarning, stacklevel=2)
                q.mode = "off"
                continue
            q.freeze()
    if (config.bias_correction or learned) and not images:
        raise DataError(f"{config.method} needs calibration images: pass calib_batches with at least one image")
    fp_model = copy.deepcopy(model).to(device).eval() if (config.bias_correction or learned) else None
    if learned and n_layers:
        from .reconstruction import reconstruct

        details["reconstruction"] = reconstruct(qmodel, fp_model, images, kind=config.reconstruction,
                                                iters=config.recon_iters, drop=config.qdrop, seed=config.seed,
                                                progress=progress)
        qmodel.eval()
    if config.bias_correction and n_layers:
        from .bias_correction import correct_biases

        details["bias_correction"] = correct_biases(qmodel, fp_model, images)
    elapsed = time.perf_counter() - t0
    logger.info("%s: %d layers, %d attention blocks, %d calibration images, %.2fs", config.label, n_layers,
                n_attn, seen, elapsed)
    return QuantizedModel(qmodel, config, seen, elapsed, details).eval()
