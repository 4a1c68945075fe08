"""Learned rounding: AdaRound (one layer at a time) and BRECQ (one block at a time), with QDrop.

Round-to-nearest minimizes each weight's own error, not the error of the layer's *output*.
AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML
2020) learns, for every weight, whether to round down or up so that the quantized layer
reproduces the full-precision layer's output on calibration images:

    W_soft = s * clamp(floor(W / s) + h(V), qmin, qmax),  h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with ``zeta = 1.1``, ``gamma = -0.1`` (the rectified sigmoid), the loss

    || f_q(x_q) - f(x) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

and ``beta`` annealed from 20 to 2 after a warm-up without the regularizer, which pushes every
``h`` to 0 or 1. At the end each weight is rounded down or up by the sign of ``V``; the step
``s`` (from the weight observer: min-max or MSE clipping) does not change.

BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction", ICLR 2021) reconstructs the output of a whole block (a transformer block, a
residual block) at once: the rounding of every layer inside it, and the steps of the block's
activation quantizers, learned jointly (LSQ-style, :func:`workbench.lsq.lsq_fake_quantize`, the
zero points stay where calibration put them). Layers outside any block (a stem, the head) are
reconstructed one at a time. QDrop (Wei et al., ICLR 2022) adds one thing: during
reconstruction each activation value is quantized only with probability ``1 - p`` and left in
float otherwise, and the block's input is the full-precision one with probability ``p`` too.

Both run *after* calibration, in the model's order, and each unit's input comes from the
quantized model with every earlier unit already reconstructed (errors upstream are what a unit
must learn to live with), while its target is the full-precision model's output for the same
images. The batches and the QDrop masks come from one generator seeded with the config's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import quant
from ..errors import ConfigError
from ..lsq import lsq_fake_quantize
from .modules import ActQuantizer, QuantLayer

#: ``none`` (round to nearest), ``adaround`` (per layer) or ``brecq`` (per block).
RECONSTRUCTIONS = ("none", "adaround", "brecq")

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound, section 3.3)
REG_WEIGHT = 0.01  # lambda of the rounding regularizer (AdaRound's default)
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # fraction of the iterations without the regularizer
ROUNDING_LR = 1e-3  # Adam on V (AdaRound's default)
STEP_LR = 4e-5  # Adam on the activation steps (BRECQ/QDrop's default)
RECON_BATCH = 32


class LearnedRounding(nn.Module):
    """The rounding of one quantized layer's weight, as learnable variables ``V``."""

    def __init__(self, qlayer: QuantLayer) -> None:
        super().__init__()
        w = qlayer.layer.weight.detach()
        qp = qlayer.weight_qparams()
        self.register_buffer("step", qp.step.to(w.dtype))
        self.qmin, self.qmax = qp.qmin, qp.qmax
        scaled = w / self.step
        self.register_buffer("w_floor", torch.floor(scaled))
        # start at the fractional part, i.e. at the float weight (h(V) = W/s - floor(W/s))
        rest = (scaled - self.w_floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self) -> torch.Tensor:
        """The soft-rounded weight (differentiable in ``V``)."""
        return torch.clamp(self.w_floor + self.h(), self.qmin, self.qmax) * self.step

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        """Each weight rounded down or up, as learned."""
        return torch.clamp(self.w_floor + (self.v >= 0).to(self.step.dtype), self.qmin, self.qmax) * self.step


class LearnedStep(nn.Module):
    """A calibrated per-tensor activation quantizer whose step is learned (LSQ), with QDrop."""

    def __init__(self, q: ActQuantizer, drop: float, generator: torch.Generator) -> None:
        super().__init__()
        self.step = nn.Parameter(q.scale.detach().clone())
        self.zero_point = float(q.zero_point)
        self.qmin, self.qmax = q.qmin, q.qmax
        self.drop = drop
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad_scale = 1.0 / math.sqrt(x.numel() * self.qmax)
        xq = lsq_fake_quantize(x, self.step, self.zero_point, self.qmin, self.qmax, grad_scale)
        if self.drop > 0 and torch.is_grad_enabled():  # QDrop: keep a random part of the values in float
            keep_float = torch.rand(x.shape, generator=self.generator, device="cpu").to(x.device) < self.drop
            return torch.where(keep_float, x, xq)
        return xq


def _block_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from timm.models.vision_transformer import Block

        types.append(Block)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    try:
        from timm.models.resnet import BasicBlock, Bottleneck

        types += [BasicBlock, Bottleneck]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def has_known_blocks(model: nn.Module) -> bool:
    """Whether ``model`` has a block that ``brecq`` can reconstruct as a unit."""
    types = _block_types()
    return bool(types) and any(isinstance(m, types) for m in model.modules())


def reconstruction_units(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """The units reconstructed one after the other, in the model's order.

    ``adaround``: every quantized Linear/Conv. ``brecq``: every block the workbench knows (timm
    ViT ``Block``, timm ResNet ``BasicBlock``/``Bottleneck``) holding quantized layers, plus each
    quantized layer outside those blocks.

    Raises:
        ConfigError: ``brecq`` on a model without such blocks.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    if kind == "adaround":
        return layers
    types = _block_types()
    blocks = [(n, m) for n, m in model.named_modules()
              if types and isinstance(m, types) and any(isinstance(c, QuantLayer) for c in m.modules())]
    if not blocks:
        raise ConfigError(
            f"block reconstruction (brecq) needs blocks it knows (timm ViT Block, ResNet BasicBlock or "
            f"Bottleneck); {type(model).__name__} has none. Use reconstruction='adaround' (one layer at a time)")
    units, done = [], set()
    for name, layer in layers:
        block = next(((bn, bm) for bn, bm in blocks if name.startswith(bn + ".")), None)
        if block is None:
            units.append((name, layer))
        elif block[0] not in done:
            units.append(block)
            done.add(block[0])
    return units


class _Capture(Exception):
    """Raised by a hook to stop the forward pass once the unit's input is captured."""


@torch.no_grad()
def _unit_inputs(model: nn.Module, unit: nn.Module, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The unit's first positional input for every batch of ``images`` (the model stops there)."""
    out: list[torch.Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple) -> None:
        out.append(args[0].detach())
        raise _Capture

    handle = unit.register_forward_pre_hook(pre_hook)
    try:
        for x in images:
            try:
                model(x)
            except _Capture:
                pass
    finally:
        handle.remove()
    return out


@torch.no_grad()
def _record_all(model: nn.Module, units: dict[str, nn.Module], images: Sequence[torch.Tensor], *,
                inputs: bool) -> dict[str, torch.Tensor]:
    """Every unit's output (and, with ``inputs``, also its input under ``name + '<in'``) over all
    ``images``, in one pass of the model: the full-precision side never changes, so it is read once."""
    out: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, unit in units.items():
        def hook(_m: nn.Module, args: tuple, y: torch.Tensor, name: str = name) -> None:
            out.setdefault(name, []).append(y.detach())
            if inputs:
                out.setdefault(name + "<in", []).append(args[0].detach())

        handles.append(unit.register_forward_hook(hook))
    try:
        for x in images:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def _loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each sample's values, averaged over the batch (as AdaRound/BRECQ)."""
    return (pred - target).pow(2).flatten(1).sum(1).mean()


def _reconstruct_unit(unit: nn.Module, q_in: torch.Tensor, fp_in: torch.Tensor | None, target: torch.Tensor,
                      *, iters: int, learn_steps: bool, drop: float, generator: torch.Generator) -> dict[str, Any]:
    layers = [m for m in unit.modules() if isinstance(m, QuantLayer) and m.w_bits is not None]
    roundings = [LearnedRounding(m).to(q_in.device) for m in layers]
    for m, r in zip(layers, roundings):
        m.__dict__["_rounding"] = r
    steps: list[tuple[ActQuantizer, LearnedStep]] = []
    if learn_steps:
        for q in unit.modules():
            if isinstance(q, ActQuantizer) and q.mode == "quant" and q.scheme == "uniform":
                learner = LearnedStep(q, drop, generator).to(q_in.device)
                q.__dict__["_learner"] = learner
                q.mode = "learn"
                steps.append((q, learner))
    params = [{"params": [r.v for r in roundings], "lr": ROUNDING_LR}]
    if steps:
        params.append({"params": [s.step for _, s in steps], "lr": STEP_LR})
    opt = torch.optim.Adam(params)
    n = q_in.shape[0]
    warm = int(WARMUP * iters)
    loss = rec = torch.zeros(())
    try:
        with torch.enable_grad():
            for it in range(iters):
                idx = torch.randint(0, n, (min(RECON_BATCH, n),), generator=generator)
                x = q_in[idx]
                if drop > 0 and fp_in is not None:  # QDrop: the float input for a random part of the values
                    keep_float = torch.rand(x.shape, generator=generator) < drop
                    x = torch.where(keep_float.to(x.device), fp_in[idx], x)
                rec = _loss(unit(x), target[idx])
                loss = rec
                if it >= warm and roundings:
                    frac = (it - warm) / max(1, iters - warm)
                    beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(math.pi * frac))
                    loss = rec + REG_WEIGHT * sum(r.regularizer(beta) for r in roundings)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        with torch.no_grad():
            for m, r in zip(layers, roundings):
                m.weight_q = r.hard().to(m.weight_q.dtype)
                del m.__dict__["_rounding"]
                m.__dict__.pop("_fold_cache", None)  # a new weight at, perhaps, the old one's address
            for q, s in steps:
                q.scale.copy_(s.step.detach().abs().clamp_min(quant.EPS_STEP).reshape(()))
                del q.__dict__["_learner"]
                q.mode = "quant"
                q.sync_numbers()
    flipped = sum(int((m.weight_q != _nearest(m)).sum()) for m in layers)
    return {"layers": len(layers), "act_steps": len(steps), "final_loss": float(rec), "flipped": flipped}


@torch.no_grad()
def _nearest(m: QuantLayer) -> torch.Tensor:
    qp = m.weight_qparams()
    return quant.fake_quantize(m.layer.weight.detach(), qp).to(m.weight_q.dtype)


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, images: Sequence[torch.Tensor], *, kind: str,
                iters: int, drop: float = 0.0, seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Learn the rounding (and, for ``brecq``, the activation steps) of ``qmodel`` in place.

    Args:
        qmodel: the calibrated quantized copy (module names as in ``fp_model``).
        fp_model: the full-precision model it was made from (never changed).
        images: the calibration batches.
        kind: ``adaround`` or ``brecq``.
        iters: optimizer steps per unit.
        drop: QDrop's probability of leaving a value in float (``brecq`` only; 0 = BRECQ).
        seed: seeds the batch sampling and the QDrop masks.

    Returns:
        One row per unit: name, layers, learned activation steps, final reconstruction loss,
        the weights rounded the other way than to nearest, and seconds.
    """
    import time

    if kind not in RECONSTRUCTIONS[1:]:
        raise ConfigError(f"reconstruction must be one of {RECONSTRUCTIONS[1:]}, got {kind!r}")
    units = reconstruction_units(qmodel, kind)
    for p in qmodel.parameters():  # only the rounding variables and steps learn: no gradients for the rest
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    fp = _record_all(fp_model, {name: fp_model.get_submodule(name) for name, _ in units}, images, inputs=drop > 0)
    rows = []
    for name, unit in tqdm(units, desc=f"{kind} reconstruction", unit="unit", disable=not progress, leave=False):
        t0 = time.perf_counter()
        q_in = torch.cat(_unit_inputs(qmodel, unit, images))
        target, fp_in = fp.pop(name), fp.pop(name + "<in", None)
        row = _reconstruct_unit(unit, q_in, fp_in, target, iters=iters, learn_steps=kind == "brecq",
                                drop=drop, generator=generator)
        rows.append({"unit": name, **row, "seconds": time.perf_counter() - t0})
    return rows
