"""Uniform quantizer primitives: the one place where quantizer math lives.

Everything else (the noise model, noise-injection pre-conditioning, PTQ, the
sigma-weighted Hessian trace) takes its step sizes from here, so the noise that
pre-conditioning injects and the quantizer that PTQ later applies cannot drift apart.

Conventions (written down once, used everywhere):

* ``bits`` is an int in ``[MIN_BITS, MAX_BITS]`` = ``[2, 16]``.
* Symmetric quantizers use the *restricted* signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]``
  with zero point 0, so ``step = absmax / (2^(b-1) - 1)``. This is the default for
  weights, per output channel.
* Asymmetric quantizers use the unsigned grid ``[0, 2^b - 1]`` with a zero point, and
  ``step = (max - min) / (2^b - 1)`` where the range is first widened to contain 0
  (so zero, e.g. padding, stays exact). This is the default for activations, per tensor.
* Round to nearest, ties to even (``torch.round``), then clamp to the grid.
* Inside the range the error ``Q(x) - x`` is at most ``step / 2``; modelled as uniform
  noise on ``[-step/2, step/2]`` its variance is ``step**2 / 12``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError

MIN_BITS = 2
MAX_BITS = 16
#: Where a bit width may say "not quantized" (``W8A32``, PTQ sweeps), it is this one value.
FLOAT_BITS = 32
#: Smallest step allowed; keeps all-zero channels/tensors from dividing by zero.
EPS_STEP = 1e-12


def check_bits(bits: object, name: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in [2, 16], else raise ConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or int(bits) != bits:
        raise ConfigError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"{name}={bits} is out of range: use {MIN_BITS} to {MAX_BITS} bits "
            f"(32 means 'not quantized' only where a function says so, e.g. W8A32)"
        )
    return bits


def check_bits_or_float(bits: object, name: str = "bits") -> int | None:
    """``None`` for :data:`FLOAT_BITS` (32: not quantized), else :func:`check_bits`.

    Raises:
        ConfigError: anything but an integer in [2, 16] or 32; e.g. 99 is out of range, not float.
    """
    if not isinstance(bits, bool) and isinstance(bits, (int, float)) and bits == FLOAT_BITS:
        return None
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or int(bits) != bits:
        raise ConfigError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, or {FLOAT_BITS} for "
                          f"'not quantized', got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ConfigError(f"{name}={int(bits)} is out of range: use {MIN_BITS} to {MAX_BITS} bits, or "
                          f"{FLOAT_BITS} for 'not quantized' (e.g. W8A32)")
    return int(bits)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` of a b-bit quantizer."""
    bits = check_bits(bits)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


def levels(bits: int, symmetric: bool) -> int:
    """Number of grid intervals: the denominator of the step formula."""
    qmin, qmax = qrange(bits, symmetric)
    return (qmax - qmin) // 2 if symmetric else qmax - qmin


def symmetric_step(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Step of a symmetric quantizer: ``absmax / (2^(b-1) - 1)``."""
    qmax = qrange(bits, symmetric=True)[1]
    return (absmax / qmax).clamp_min(EPS_STEP)


def asymmetric_step(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of an asymmetric quantizer over ``[min(xmin,0), max(xmax,0)]``.

    Returns ``(step, zero_point)`` with the zero point as a float tensor holding an
    integer value in ``[0, 2^b - 1]``.
    """
    qmin, qmax = qrange(bits, symmetric=False)
    xmin = torch.as_tensor(xmin).clamp_max(0.0)
    xmax = torch.as_tensor(xmax).clamp_min(0.0)
    step = ((xmax - xmin) / (qmax - qmin)).clamp_min(EPS_STEP)
    zero_point = (qmin - torch.round(xmin / step)).clamp(qmin, qmax)
    return step, zero_point


def channel_absmax(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Per-channel ``max|w|`` along ``axis``, shaped to broadcast against ``w``."""
    dims = [d for d in range(w.dim()) if d != axis % w.dim()]
    return w.detach().abs().amax(dim=dims, keepdim=True) if dims else w.detach().abs()


def channel_shape(w: torch.Tensor, axis: int = 0) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``w``."""
    shape = [1] * w.dim()
    shape[axis % w.dim()] = w.shape[axis]
    return shape


@dataclass(frozen=True)
class QParams:
    """Parameters of one uniform quantizer (per tensor or broadcastable per channel)."""

    step: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int
    symmetric: bool

    @property
    def noise_std(self) -> torch.Tensor:
        """Std of the rounding error under the uniform model: ``step / sqrt(12)``."""
        return self.step / math.sqrt(12.0)

    def lower(self) -> torch.Tensor:
        """Smallest representable value."""
        return (self.qmin - self.zero_point) * self.step

    def upper(self) -> torch.Tensor:
        """Largest representable value."""
        return (self.qmax - self.zero_point) * self.step


def weight_qparams(w: torch.Tensor, bits: int, per_channel: bool = True, axis: int = 0,
                   absmax: torch.Tensor | None = None) -> QParams:
    """Symmetric weight quantizer from the (detached) weights themselves.

    Args:
        w: weight tensor, output channels along ``axis`` (Linear and Conv: axis 0).
        bits: 2..16.
        per_channel: one step per output channel (default) or one for the tensor.
        absmax: optional clipping value(s) overriding ``max|w|`` (from an observer).
    """
    bits = check_bits(bits, "w_bits")
    if absmax is None:
        absmax = channel_absmax(w, axis) if per_channel else w.detach().abs().amax()
    step = symmetric_step(absmax, bits)
    qmin, qmax = qrange(bits, symmetric=True)
    return QParams(step, torch.zeros_like(step), qmin, qmax, bits, True)


def activation_qparams(xmin: torch.Tensor | float, xmax: torch.Tensor | float, bits: int,
                       symmetric: bool = False) -> QParams:
    """Per-tensor activation quantizer from an observed range.

    Asymmetric (default): ``step = (max - min) / (2^b - 1)`` over a range containing 0.
    Symmetric: ``step = max(|min|, |max|) / (2^(b-1) - 1)``, zero point 0.
    """
    bits = check_bits(bits, "a_bits")
    xmin = torch.as_tensor(xmin, dtype=torch.float32)
    xmax = torch.as_tensor(xmax, dtype=torch.float32)
    if symmetric:
        step = symmetric_step(torch.maximum(xmin.abs(), xmax.abs()), bits)
        qmin, qmax = qrange(bits, symmetric=True)
        return QParams(step, torch.zeros_like(step), qmin, qmax, bits, True)
    step, zp = asymmetric_step(xmin, xmax, bits)
    qmin, qmax = qrange(bits, symmetric=False)
    return QParams(step, zp, qmin, qmax, bits, False)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (as float tensor holding integers) ``clamp(round(x/step) + zp)``."""
    return torch.clamp(torch.round(x / qp.step) + qp.zero_point, qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Real values of integer codes: ``(q - zp) * step``."""
    return (q - qp.zero_point) * qp.step


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize-dequantize ``x`` (no gradient trickery: use for PTQ and measurement)."""
    return dequantize(quantize(x, qp), qp)


def quantization_error(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``Q(x) - x``: the error that the noise model stands in for."""
    return fake_quantize(x, qp) - x


def uniform_error_std(step: torch.Tensor | float) -> torch.Tensor | float:
    """Std of a uniform rounding error of the given step: ``step / sqrt(12)``."""
    return step / math.sqrt(12.0)


def parse_bits_pair(text: str) -> tuple[int | None, int | None]:
    """Parse ``'W4A8'``, ``'4,8'``, ``'4'`` (both 4) or ``'W8A32'`` (32 = not quantized).

    Returns ``(w_bits, a_bits)`` with ``None`` for 'not quantized'.

    Raises:
        ConfigError: unreadable text, or a width outside 2..16 other than 32 (``'99'`` is out of
            range, not 'not quantized').
    """
    s = str(text).strip().upper().replace(" ", "")
    try:
        if s.startswith("W") and "A" in s:
            w_txt, a_txt = s[1:].split("A", 1)
        elif "," in s:
            w_txt, a_txt = s.split(",", 1)
        else:
            w_txt = a_txt = s
        w, a = int(w_txt), int(a_txt)
    except ValueError:
        raise ConfigError(
            f"cannot read bit widths from {text!r}: write e.g. 'W4A8', '4,8' or '4'"
        ) from None
    return check_bits_or_float(w, "w_bits"), check_bits_or_float(a, "a_bits")


def parse_bits_list(spec: str | int | Sequence[object] | None, name: str = "bits", *,
                    allow_float: bool = True) -> list[int | None]:
    """The one reader of a list of widths: ``'8,6,4'``, ``[8, 6]`` or ``4``; empty items are
    skipped. With ``allow_float``, 32 is 'not quantized' (``None``); without it, only 2..16.

    Raises:
        ConfigError: an item that is not a whole number, or out of range; the message names ``name``.
    """
    if spec is None:
        return []
    items = str(spec).split(",") if isinstance(spec, (str, int)) else list(spec)
    out: list[int | None] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            bits = int(text)
        except ValueError:
            raise ConfigError(f"{name}: cannot read a bit width from {text!r}: use whole numbers such as 8,6,4,3"
                              ) from None
        out.append(check_bits_or_float(bits, name) if allow_float else check_bits(bits, name))
    return out


def log2_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of a log2 quantizer for values in ``[0, 1]`` (softmax outputs, as in ViT PTQ papers).

    ``q = clamp(round(-log2 x), 0, 2^b - 1)``; the top code ``2^b - 1`` stands for 0, so the
    grid is ``{1, 1/2, ..., 2^-(2^b - 2), 0}``. Powers of two resolve the many small attention
    probabilities far better than a uniform grid of the same width.
    """
    qmax = 2 ** check_bits(bits) - 1
    # clamp_min keeps log2(0) finite; anything that small lands on the 'zero' code anyway
    return torch.round(-torch.log2(x.clamp_min(2.0 ** -(qmax + 1)))).clamp(0, qmax)


def log2_dequantize(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Real values of log2 codes: ``2^-q``, and 0 for the top code."""
    qmax = 2 ** check_bits(bits) - 1
    return torch.where(q >= qmax, torch.zeros_like(q), torch.exp2(-q))


def log2_fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with the log2 quantizer (inputs expected in ``[0, 1]``)."""
    return log2_dequantize(log2_quantize(x, bits), bits)


# --------------------------------------------------------------------------- fused kernels


def fused_fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, lo: float | torch.Tensor,
                        hi: float | torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``clamp(round(x / scale), lo, hi) * scale`` with ``lo = qmin - zp``, ``hi = qmax - zp``.

    Equal to :func:`workbench.quant.fake_quantize` (the zero point is an integer, so it can move
    into the clamp bounds), in one allocation and three in-place passes. On CPU this is about
    20x faster than ``torch.fake_quantize_per_tensor_affine``, whose kernel is not vectorized.
    ``inplace`` overwrites ``x`` (only for tensors the caller owns: saves a large allocation).
    """
    return (x.div_(scale) if inplace else x.div(scale)).round_().clamp_(lo, hi).mul_(scale)


def fused_quantize_codes(x: torch.Tensor, scale: torch.Tensor | float, lo: float | torch.Tensor,
                         hi: float | torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``clamp(round(x / scale), lo, hi)``: :func:`fused_fake_quantize` without the final ``* scale``,
    for callers that fold the scale into the next matmul's other operand (one pass fewer)."""
    return (x.div_(scale) if inplace else x.div(scale)).round_().clamp_(lo, hi)
