"""Fake-quantization wrappers that replace layers inside the quantized copy.

* :class:`ActQuantizer`: one per-tensor activation quantizer. Mode ``"observe"`` feeds an
  observer and passes values through (calibration); mode ``"quant"`` fake-quantizes with
  :func:`fused_fake_quantize` (one allocation, three in-place passes) so run time stays close to FP.
* :class:`QuantLinear` / :class:`QuantConv`: quantize the layer's *input* at run time; the
  weight is quantized once at conversion (weights are constant after calibration) and stored
  as a buffer, so the forward pass is one input fake-quant plus the original matmul/conv.
* :class:`QuantAttention`: a timm ``Attention`` block whose two matmuls get quantized inputs
  (q, k, v and the softmax output). Softmax itself, like LayerNorm and GELU, is computed in
  floating point.

Every wrapper also has an integer export path (used by :mod:`workbench.ptq.onnx_export`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..quant import fused_fake_quantize, fused_quantize_codes
from .integer_ops import integer_conv, integer_linear, integer_matmul
from .observers import Observer


def _hooked(m: nn.Module) -> bool:
    """Someone watches this quantizer (e.g. an error measurement): call it, do not bypass it."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer (uniform affine or log2).

    Args:
        bits: bit width, 2..16.
        symmetric: signed grid with zero point 0 instead of the default asymmetric grid.
        observer: range observer (unused for ``scheme="log2"``, whose range is fixed to [0, 1]).
        scheme: ``"uniform"`` or ``"log2"`` (softmax outputs only).
        label: what the tensor is (``"input"``, ``"q"``, ``"k"``, ``"v"``, ``"softmax"``).
    """

    def __init__(self, bits: int, symmetric: bool, observer: Observer | None, scheme: str = "uniform",
                 label: str = "input") -> None:
        super().__init__()
        self.bits = quant.check_bits(bits, "a_bits")
        self.symmetric = symmetric
        self.scheme = scheme
        self.label = label
        self.observer = observer
        self.mode = "observe" if scheme == "uniform" else "quant"
        self.qmin, self.qmax = quant.qrange(self.bits, symmetric)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        # python numbers for the hot path (no tensor->number syncs per call)
        self._scale_f, self._lo, self._hi = 1.0, float(self.qmin), float(self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "learn":  # block reconstruction (BRECQ/QDrop): a learned step, see reconstruction.py
            return self.__dict__["_learner"](x)
        if self.mode == "quant":
            if self.scheme == "log2":
                return quant.log2_fake_quantize(x, self.bits)
            return fused_fake_quantize(x, self._scale_f, self._lo, self._hi)
        if self.mode == "observe" and self.observer is not None:
            self.observer.update(x)
        return x

    def freeze(self) -> None:
        """Turn the observed range into (scale, zero point) and switch to quantizing."""
        if self.scheme == "uniform":
            lo, hi = self.observer.activation_range(self.bits, self.symmetric)
            qp = quant.activation_qparams(lo, hi, self.bits, symmetric=self.symmetric)
            self.scale.copy_(qp.step.reshape(()).float())
            self.zero_point.copy_(qp.zero_point.reshape(()).to(torch.int32))
            self.observer = None  # drop the calibration sample
        self.sync_numbers()
        self.mode = "quant"

    def sync_numbers(self) -> None:
        """Refresh the Python copies of scale and range the fast path reads, after the ``scale`` or
        ``zero_point`` buffers changed (a reparameterization, a learned step, a loaded state)."""
        zp = int(self.zero_point)
        self._scale_f, self._lo, self._hi = float(self.scale), float(self.qmin - zp), float(self.qmax - zp)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.sync_numbers()  # keep the python copies in step with loaded buffers
        if self.scheme == "uniform":
            self.mode, self.observer = "quant", None  # loaded scales are calibrated scales

    def qparams(self) -> quant.QParams:
        """The frozen quantizer as :class:`workbench.quant.QParams` (uniform scheme)."""
        return quant.QParams(self.scale.clone(), self.zero_point.float(), self.qmin, self.qmax,
                             self.bits, self.symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}, symmetric={self.symmetric}, label={self.label}"


class QuantLayer(nn.Module):
    """Shared parts of QuantLinear and QuantConv: precomputed weight, optional input quantizer."""

    export_mode: bool = False

    def __init__(self, layer: nn.Module, w_bits: int | None, per_channel: bool,
                 w_observer: Observer | None, input_quant: ActQuantizer | None) -> None:
        super().__init__()
        self.layer = layer  # the FP layer (copy): its weight stays available for inspection
        self.w_bits = w_bits
        self.per_channel = per_channel
        self.w_observer_name = w_observer.name if w_observer is not None else None
        self.input_quant = input_quant
        self.register_buffer("w_step", None)
        self.register_buffer("weight_q", None)
        if w_bits is not None:
            self.quantize_weight(w_observer)

    @torch.no_grad()
    def quantize_weight(self, w_observer: Observer) -> None:
        """(Re)quantize ``layer.weight`` to the nearest grid point, with the observer's clipping.

        Weights are constants: they are quantized once here instead of on every forward. Called
        again after something changes the float weight (the RepQ reparameterization does).
        """
        w = self.layer.weight.detach()
        absmax = w_observer.weight_absmax(w, self.w_bits, self.per_channel)
        qp = quant.weight_qparams(w, self.w_bits, per_channel=self.per_channel, axis=0, absmax=absmax)
        self.w_step = qp.step.float()
        self.weight_q = quant.fake_quantize(w, qp)
        self.w_observer_name = w_observer.name
        self.__dict__.pop("_fold_cache", None)  # the cached folded weight is the old one

    @property
    def weight(self) -> torch.Tensor:
        """The weight the forward pass uses (quantized if ``w_bits`` is set).

        During learned rounding (AdaRound, BRECQ) it is the soft-rounded weight of the rounding
        being learned, so gradients reach the rounding variables.
        """
        rounding = self.__dict__.get("_rounding")
        if rounding is not None:
            return rounding()
        return self.layer.weight if self.weight_q is None else self.weight_q

    def _folded(self) -> tuple[torch.Tensor, float, float, torch.Tensor] | None:
        """``(weight * input_scale, scale, lo, hi)`` when the input quantizer is a calibrated uniform one.

        ``W @ (s * codes) == (s * W) @ codes``: multiplying the (small, constant) weight by the input
        step once saves the last of the four elementwise passes over every activation. Cached; the
        key notices a new scale, device, dtype or an in-place change of the weight.
        """
        q = self.input_quant
        if q is None or q.mode != "quant" or q.scheme != "uniform" or torch.is_grad_enabled() or _hooked(q):
            return None
        if self.__dict__.get("_rounding") is not None:  # a fresh soft weight per call: nothing to cache
            return None
        w = self.weight
        key = (q._scale_f, q._lo, q._hi, w.device, w.dtype, w.data_ptr(), w._version)
        cache = self.__dict__.get("_fold_cache")
        if cache is None or cache[0] != key:
            cache = (key, w * q._scale_f)
            self.__dict__["_fold_cache"] = cache
        return cache[1], q._scale_f, q._lo, q._hi

    def weight_qparams(self) -> quant.QParams | None:
        if self.w_bits is None:
            return None
        qmin, qmax = quant.qrange(self.w_bits, True)
        return quant.QParams(self.w_step, torch.zeros_like(self.w_step), qmin, qmax, self.w_bits, True)

    def weight_codes(self) -> torch.Tensor | None:
        """Integer weight codes (int32 tensor), or None if weights are not quantized."""
        qp = self.weight_qparams()
        return None if qp is None else quant.quantize(self.weight_q, qp).to(torch.int32)


class QuantLinear(QuantLayer):
    """``nn.Linear`` with fake-quantized input and precomputed quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_mode:

            return integer_linear(self, x)
        folded = self._folded()
        if folded is not None:
            w, scale, lo, hi = folded
            return F.linear(fused_quantize_codes(x, scale, lo, hi), w, self.layer.bias)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight, self.layer.bias)


class QuantConv(QuantLayer):
    """``nn.Conv1d/2d/3d`` with fake-quantized input and precomputed quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_mode:

            return integer_conv(self, x)
        folded = self._folded()
        if folded is not None:  # padding pads codes: a padded code c stands for s * c, as before
            w, scale, lo, hi = folded
            return self.layer._conv_forward(fused_quantize_codes(x, scale, lo, hi), w, self.layer.bias)
        if self.input_quant is not None:
            x = self.input_quant(x)
        # _conv_forward handles padding modes exactly as the original layer does
        return self.layer._conv_forward(x, self.weight, self.layer.bias)


class QuantAttention(nn.Module):
    """A timm ``Attention`` block computed explicitly, with quantized matmul inputs.

    Same parameters (it takes over the block's submodules) and the maths of timm's non-fused
    path, with per-tensor quantizers on q, k and v (as they leave the qkv projection, before
    the ``head_dim**-0.5`` scaling, which in integer terms folds into the output scale) and on
    the softmax output. Softmax, the optional q/k norms and masks stay in floating point.

    Speed: once calibrated, q, k and v are fake-quantized in one pass over the contiguous qkv
    output with a per-column step vector, instead of three passes over strided views, and the
    dequantizing multiplications fold into that pass (see :meth:`_fused_qkv_params`).
    """

    export_mode: bool = False

    def __init__(self, attn: nn.Module, q_quant: ActQuantizer, k_quant: ActQuantizer, v_quant: ActQuantizer,
                 softmax_quant: ActQuantizer) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.gate = getattr(attn, "gate", None)
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.q_quant = q_quant
        self.k_quant = k_quant
        self.v_quant = v_quant
        self.attn_drop = attn.attn_drop
        self.softmax_quant = softmax_quant
        self.norm = getattr(attn, "norm", nn.Identity())
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self._qkv_fq: tuple | None = None  # (key, step, lo, hi, out_mult), see _fused_qkv_params

    def _fused_qkv_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
        """``(step, lo, hi, out_mult, softmax_folded)`` vectors over the 3 * attn_dim qkv columns, or None.

        ``out_mult`` is what the integer codes are multiplied by: the step, times the attention
        scale for q (``(s q) k^T`` needs no extra pass over q) and times the softmax step for v when
        the softmax output is uniformly quantized (``(s_a A) v == A (s_a v)``: no pass over the
        large attention matrix to dequantize it).
        """
        qs = (self.q_quant, self.k_quant, self.v_quant)
        if not all(q.mode == "quant" and q.scheme == "uniform" and not _hooked(q) for q in qs):
            return None
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            return None  # q/k are normalized after the projection: quantize them after the norm
        sq = self.softmax_quant
        softmax_folded = sq.mode == "quant" and sq.scheme == "uniform" and not _hooked(sq)
        key = (tuple((q._scale_f, q._lo, q._hi) for q in (*qs, sq)), softmax_folded, self.qkv.weight.device)
        if self._qkv_fq is None or self._qkv_fq[0] != key:
            n = self.attn_dim
            rep = lambda v: torch.tensor([v], dtype=torch.float64).repeat(n)  # noqa: E731
            step = torch.cat([rep(q._scale_f) for q in qs])
            lo = torch.cat([rep(q._lo) for q in qs])
            hi = torch.cat([rep(q._hi) for q in qs])
            mult = torch.cat([rep(self.q_quant._scale_f * self.scale), rep(self.k_quant._scale_f),
                              rep(self.v_quant._scale_f * (sq._scale_f if softmax_folded else 1.0))])
            dev = self.qkv.weight.device
            self._qkv_fq = (key, *(t.to(device=dev, dtype=torch.float32) for t in (step, lo, hi, mult)))
        return (*self._qkv_fq[1:], softmax_folded)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)  # (B, N, 3 * attn_dim)
        fused = None if self.export_mode or qkv.requires_grad else self._fused_qkv_params()
        if fused is not None:
            step, lo, hi, mult, softmax_folded = fused
            qkv = fused_quantize_codes(qkv, step, lo, hi, inplace=True).mul_(mult)  # our own tensor: no copy
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # each (B, heads, N, head_dim)
        if self.export_mode:

            attn = integer_matmul(q, k.transpose(-2, -1), self.q_quant, self.k_quant, self.scale)
        elif fused is not None:
            attn = q @ k.transpose(-2, -1)  # q already carries the attention scale
        else:
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        if attn_mask is not None or is_causal:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))  # softmax in floating point
        if self.export_mode:

            x = integer_matmul(attn, v, self.softmax_quant, self.v_quant, 1.0)
        else:
            sq = self.softmax_quant
            if fused is not None and fused[4]:
                attn = fused_quantize_codes(attn, sq._scale_f, sq._lo, sq._hi, inplace=True)  # v carries s_a
            elif sq.mode == "quant" and sq.scheme == "uniform" and not attn.requires_grad and not _hooked(sq):
                attn = fused_fake_quantize(attn, sq._scale_f, sq._lo, sq._hi, inplace=True)  # ours too
            else:
                attn = sq(attn)
            x = attn @ v  # (B, heads, N, head_dim)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
