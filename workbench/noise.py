"""Noise-injection pre-conditioning: Gaussian stand-ins for future quantization error.

During full-precision training every selected Linear/Conv layer sees

* weight noise, per output channel, ``sigma_w = k_w * step_w / sqrt(12)`` with ``step_w`` the
  step of the symmetric per-channel quantizer of the *current* (detached) weights at ``w_bits``;
* activation noise on its input, per tensor, ``sigma_a = k_a * step_a / sqrt(12)`` with
  ``step_a`` the step of the asymmetric per-tensor quantizer over a running (EMA) min/max
  range at ``a_bits``.

Both steps come from :mod:`workbench.quant` (``weight_qparams`` / ``activation_qparams``), the
quantizer that PTQ applies later, so the noise model and the real quantizer cannot drift apart.

How it is made cheap (a straightforward parametrization + per-layer hooks with fresh random
numbers and a fresh min/max of every activation costs about 2x a plain step):

* **Weights are perturbed in place**, all layers at once with ``torch._foreach_*`` ops, by one
  forward pre-hook on the root module. The clean weights are kept in a copy and written back
  (bit-exactly, by copy, not by subtraction) by a ``post_accumulate_grad`` hook as soon as each
  weight's gradient is complete. Since the noise is additive, the gradient at the noisy point
  *is* the gradient with respect to the clean weight, so it lands on the clean parameter and the
  optimizer steps from clean weights. Nothing is re-parametrized: state_dict keys, parameter
  objects and the optimizer are untouched.
* **Random numbers come from a bank**: a buffer of unit-variance samples (Gaussian or uniform),
  sliced at a random offset for each tensor and scaled in the same fused kernel that adds it
  (``addcmul``). A slice of the bank is regenerated every training forward pass
  (``bank_refresh``), so the whole bank is renewed every ``1 / bank_refresh`` steps. Trade-off:
  within one tensor the samples are exactly i.i.d. from the bank; across layers and nearby steps
  noise tensors can share (shifted) samples. Set ``bank=False`` for fresh samples every time
  (exact, slower: Gaussian sampling of every activation costs several percent of a CPU step).
* **Activation ranges are refreshed every** ``a_stats_every`` **training passes** (an EMA of the
  per-batch min/max, momentum ``ema_momentum`` per refresh); in between, the cached
  ``sigma_a`` (a device tensor, no host sync) is reused. Weight steps are recomputed every
  ``w_stats_every`` passes (default: every pass, as the model prescribes).

Several processes (DDP, see :mod:`workbench.distributed`): each rank draws its own noise (the
training loop seeds rank ``r`` with ``seed + r``). Weight noise needs nothing more: its scales
derive from the weights, which DDP keeps identical on every rank. The activation ranges are
per-rank EMAs of per-shard min/max, so :meth:`NoiseHandle.sync_ranges` (called by the training
method after each step; one all-reduce of ``2 x layers`` numbers after each range refresh, i.e.
every ``a_stats_every`` steps, nothing in between) replaces them by the minimum of the minima and
the maximum of the maxima over the ranks. Since every rank starts a refresh from the same synced
value and the EMA is monotone in the new batch's value, the synced range is exactly the EMA of
the *global* batch's min/max that one process would keep; only the refreshing pass itself uses
its rank's own range.

Limits: between a training forward pass and the end of its backward pass the parameters hold
noisy values (reading them there sees the noise); a forward pass in training mode that is never
followed by a backward pass leaves them noisy until the next forward pass, :meth:`NoiseHandle.restore`,
``state_dict()`` or :meth:`NoiseHandle.remove`. ``backward(retain_graph=True)`` followed by a
second backward through the same graph fails with autograd's in-place error.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import distributed as wdist
from . import quant
from .config import ConfigBase, check_number
from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("gaussian", "uniform")
SCHEDULES = ("constant", "ramp")
#: Layer types that get noise (subclasses included: timm's Conv2dSame, LoRA-style Linear, ...).
NOISY_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class NoiseSites(ConfigBase):
    """Which quantizers the noise imitates, where it goes and how it is scheduled: the fields that
    :class:`NoiseConfig` and :class:`~workbench.precondition.MethodConfig` share, declared and
    checked once here. ``None`` bits switch that kind of noise off."""

    w_bits: int | None = 4  # bits of the weight quantizer whose error the noise imitates
    a_bits: int | None = 8  # bits of the activation quantizer
    include: tuple[str, ...] = ("*",)  # fnmatch patterns on module names
    exclude: tuple[str, ...] = ()  # e.g. ('head', 'patch_embed.*') to keep them clean
    schedule: str = "constant"  # or 'ramp': linear from 0 to 1 over ramp_epochs
    ramp_epochs: float = 1.0
    ema_momentum: float = 0.9  # activation range EMA, per range refresh
    a_stats_every: int = 4  # refresh activation ranges every N training passes
    bank: bool = True  # draw noise from a refreshed bank (fast) instead of fresh samples

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, quant.check_bits(value, name))
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "ramp" and not self.ramp_epochs > 0:
            raise ConfigError(f"ramp_epochs must be > 0 for schedule='ramp', got {self.ramp_epochs!r}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1), got {self.ema_momentum!r}")
        if int(self.a_stats_every) < 1:
            raise ConfigError(f"a_stats_every must be >= 1, got {self.a_stats_every!r}")
        # tuples, also when built from lists (dicts, YAML, CLI)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))


@dataclass(frozen=True)
class NoiseConfig(NoiseSites):
    """What noise to inject where (:class:`NoiseSites`), how strong, and how it is drawn."""

    KIND: ClassVar[str] = "NoiseConfig field"

    noise_mult_w: float = 1.0  # k_w: sigma_w = k_w * step_w / sqrt(12)
    noise_mult_a: float = 1.0  # k_a
    distribution: str = "gaussian"  # or 'uniform' (same variance), e.g. as a control
    w_stats_every: int = 1  # recompute weight steps every N training passes
    bank_refresh: float = 0.0625  # fraction of the bank regenerated per training pass
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("noise_mult_w", "noise_mult_a"):
            check_number(name, getattr(self, name))
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if int(self.w_stats_every) < 1:
            raise ConfigError(f"w_stats_every must be >= 1, got {self.w_stats_every!r}")
        if not 0.0 < self.bank_refresh <= 1.0:
            raise ConfigError(f"bank_refresh must be in (0, 1], got {self.bank_refresh!r}")

    @property
    def weight_noise(self) -> bool:
        return self.w_bits is not None and self.noise_mult_w > 0

    @property
    def act_noise(self) -> bool:
        return self.a_bits is not None and self.noise_mult_a > 0


def schedule_scale(config: NoiseConfig, step: int, steps_per_epoch: int) -> float:
    """Noise scale in [0, 1] at global training step ``step`` (0-based).

    'constant' is always 1; 'ramp' rises linearly, step by step, reaching 1 after
    ``ramp_epochs`` epochs.
    """
    if config.schedule == "constant":
        return 1.0
    total = config.ramp_epochs * max(1, steps_per_epoch)
    return float(min(1.0, (step + 1) / total))


def select_layers(model: nn.Module, include: tuple[str, ...] = ("*",),
                  exclude: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """Linear/Conv layers of ``model`` whose names match ``include`` and not ``exclude``.

    Raises:
        ModelError: the model has no Linear/Conv layer, or the patterns select none.
    """
    candidates = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, NOISY_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not candidates:
        raise ModelError(f"{type(model).__name__} has no Linear/Conv layer to inject noise into "
                         f"or to quantize")
    chosen = [(n, m) for n, m in candidates
              if any(fnmatch.fnmatchcase(n, p) for p in include)
              and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not chosen:
        raise ModelError(f"include={list(include)} / exclude={list(exclude)} select none of the "
                         f"{len(candidates)} Linear/Conv layers (e.g. {candidates[0][0]!r})")
    return chosen


class _Bank:
    """Unit-variance random samples per (device, dtype), sliced at random offsets."""

    MIN_SIZE = 1 << 20
    GROWTH = 2  # bank holds at least GROWTH x the largest tensor, so offsets vary

    def __init__(self, distribution: str, seed: int, refresh: float) -> None:
        self.distribution = distribution
        self.seed = seed
        self.refresh_frac = refresh
        self.offsets = random.Random(seed)
        self.banks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.cursor: dict[tuple[torch.device, torch.dtype], int] = {}
        self.generators: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed + 7919 * len(self.generators))
            self.generators[device] = g
        return self.generators[device]

    def _fill(self, t: torch.Tensor, device: torch.device) -> None:
        if self.distribution == "gaussian":
            t.normal_(0.0, 1.0, generator=self._gen(device))
        else:  # uniform on [-sqrt(3), sqrt(3)] has variance 1
            s = math.sqrt(3.0)
            t.uniform_(-s, s, generator=self._gen(device))

    def fresh(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        self._fill(t, device)
        return t

    def take(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D view of ``n`` bank samples starting at a random offset."""
        key = (device, dtype)
        bank = self.banks.get(key)
        if bank is None or bank.numel() < self.GROWTH * n:
            size = max(self.MIN_SIZE, self.GROWTH * n)
            bank = torch.empty(size, dtype=dtype, device=device)
            self._fill(bank, device)
            self.banks[key], self.cursor[key] = bank, 0
        start = self.offsets.randrange(0, bank.numel() - n + 1)
        return bank[start:start + n]

    def state_dict(self) -> dict[str, Any]:
        """Everything the next draws depend on: the banks, their cursors, the generators and the
        offset stream. Resuming from it continues the exact sequence of noise samples."""
        return {
            "offsets": self.offsets.getstate(),
            "banks": {_key_name(k): b.detach().cpu().clone() for k, b in self.banks.items()},
            "cursor": {_key_name(k): int(c) for k, c in self.cursor.items()},
            "generators": [(str(d), g.get_state()) for d, g in self.generators.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        version, internal, gauss = state["offsets"]
        self.offsets.setstate((version, tuple(internal), gauss))
        self.banks = {}
        self.cursor = {}
        for name, bank in state["banks"].items():
            key = _key_from_name(name)
            self.banks[key] = bank.to(key[0])
            self.cursor[key] = int(state["cursor"][name])
        # insertion order matters: a new device's generator is seeded by how many exist already
        self.generators = {}
        for dev, gstate in state["generators"]:
            g = torch.Generator(device=torch.device(dev))
            g.set_state(gstate)
            self.generators[torch.device(dev)] = g

    def refresh(self) -> None:
        """Regenerate the next ``refresh_frac`` slice of every bank (rolling)."""
        for key, bank in self.banks.items():
            chunk = max(1, int(bank.numel() * self.refresh_frac))
            pos = self.cursor[key]
            part = bank[pos:pos + chunk]
            self._fill(part, key[0])
            self.cursor[key] = (pos + part.numel()) % bank.numel()


def _key_name(key: tuple[torch.device, torch.dtype]) -> str:
    # plain strings, so checkpoints stay loadable with weights_only=True
    return f"{key[0]}|{str(key[1]).removeprefix('torch.')}"


def _key_from_name(name: str) -> tuple[torch.device, torch.dtype]:
    dev, dtype = name.split("|")
    return torch.device(dev), getattr(torch, dtype)


class _ActState:
    __slots__ = ("calls", "xmin", "xmax", "sigma")

    def __init__(self) -> None:
        self.calls = 0
        self.xmin: torch.Tensor | None = None
        self.xmax: torch.Tensor | None = None
        self.sigma: torch.Tensor | None = None


class NoiseHandle:
    """A noise pre-conditioner attached to a model; see :func:`attach`.

    Use :meth:`set_scale` for schedules, :meth:`restore` to make sure the parameters are clean
    (the training method calls it after ``backward``), :meth:`remove` to detach completely.
    Works as a context manager (removes on exit).
    """

    def __init__(self, model: nn.Module, config: NoiseConfig) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = config
        self.layers = select_layers(model, config.include, config.exclude)
        self.scale = 1.0
        self.steps = 0  # training forward passes seen
        self._bank = _Bank(config.distribution, config.seed, config.bank_refresh)
        self._hooks: list[Any] = []
        self._removed = False
        # weights, deduplicated (tied weights get noise once)
        seen: dict[int, int] = {}
        self._weights: list[torch.Tensor] = []
        self._wnames: list[str] = []
        for name, m in self.layers:
            if id(m.weight) not in seen:
                seen[id(m.weight)] = len(self._weights)
                self._weights.append(m.weight)
                self._wnames.append(name)
        self._clean: list[torch.Tensor] = []
        self._sigma_w: list[torch.Tensor] = []
        self._dirty = [False] * len(self._weights)
        self._act = [_ActState() for _ in self.layers]
        self._ranges_refreshed = False  # a range changed since the last sync_ranges()

        self._hooks.append(model.register_forward_pre_hook(self._root_pre_hook))
        if config.weight_noise:
            self._clean = [torch.empty_like(w, memory_format=torch.preserve_format) for w in self._weights]
            for i, w in enumerate(self._weights):
                if w.requires_grad:
                    self._hooks.append(w.register_post_accumulate_grad_hook(self._make_grad_hook(i)))
            for _, m in self.layers:
                self._hooks.append(m.register_state_dict_pre_hook(self._state_dict_pre_hook))
        if config.act_noise:
            for i, (_, m) in enumerate(self.layers):
                self._hooks.append(m.register_forward_pre_hook(self._make_act_hook(i)))
        log.info("noise attached to %d layers (weights: %s, activations: %s)", len(self.layers),
                 config.weight_noise, config.act_noise)

    # ---- public API -------------------------------------------------------------------
    def set_scale(self, factor: float) -> None:
        """Multiply every noise std by ``factor`` (>= 0) from the next forward pass on."""
        factor = float(factor)
        if not math.isfinite(factor) or factor < 0:
            raise ConfigError(f"noise scale must be a finite number >= 0, got {factor!r}")
        self.scale = factor

    @torch.no_grad()
    def restore(self) -> None:
        """Write the clean weights back wherever noise is still applied (cheap if none)."""
        if any(self._dirty):
            idx = [i for i, d in enumerate(self._dirty) if d]
            torch._foreach_copy_([self._weights[i] for i in idx], [self._clean[i] for i in idx])
            for i in idx:
                self._dirty[i] = False

    def remove(self) -> None:
        """Restore the clean weights and detach every hook: the original forward is back."""
        if self._removed:
            return
        self.restore()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._removed = True

    def layer_names(self) -> list[str]:
        return [n for n, _ in self.layers]

    @torch.no_grad()
    def noise_std(self) -> dict[str, dict[str, torch.Tensor | None]]:
        """Current noise std per layer (before ``scale``): ``{'w': per-channel, 'a': scalar}``.

        Weight stds are computed from the current clean weights; activation stds are the
        cached EMA-based values (``None`` before the first training pass).
        """
        out: dict[str, dict[str, torch.Tensor | None]] = {}
        widx = {id(w): i for i, w in enumerate(self._weights)}
        for i, (name, m) in enumerate(self.layers):
            w = self._clean[widx[id(m.weight)]] if self._dirty[widx[id(m.weight)]] else m.weight
            out[name] = {
                "w": self._weight_sigma(w) if self.config.weight_noise else None,
                "a": self._act[i].sigma.clone() if self._act[i].sigma is not None else None,
            }
        return out

    @torch.no_grad()
    def sync_ranges(self) -> bool:
        """Make the activation ranges equal on every rank: min of the minima, max of the maxima.

        Cheap enough to call after every step: it communicates only when a range was refreshed
        since the last call (every ``a_stats_every`` passes), with one all-reduce of all layers'
        ranges. Every rank must call it equally often (the training method does). A no-op
        without a process group of two or more.

        Returns:
            Whether ranges were exchanged.
        """
        if not self._ranges_refreshed:
            return False
        self._ranges_refreshed = False
        ranges = [(s, s.xmin, s.xmax) for s in self._act if s.xmin is not None and s.xmax is not None]
        if not ranges or not wdist.is_distributed():
            return False
        dev = self._weights[0].device
        # one MAX all-reduce: maxima of (-xmin, xmax) = (-min of minima, max of maxima)
        packed = torch.stack([-mn.to(dev) for _, mn, _ in ranges] + [mx.to(dev) for _, _, mx in ranges])
        wdist.all_reduce_(packed, "max")
        n = len(ranges)
        for (s, mn, mx), new_mn, new_mx in zip(ranges, packed[:n], packed[n:]):
            mn.copy_(-new_mn)
            mx.copy_(new_mx)
            s.sigma = self._act_sigma(mn, mx)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Running activation ranges and counters, to resume a run."""
        return {"steps": self.steps, "scale": self.scale,
                "act": [{"calls": s.calls, "xmin": s.xmin, "xmax": s.xmax} for s in self._act],
                # the cached weight stds (refreshed every w_stats_every passes, so older than the
                # weights) and the noise stream: without them a resumed run draws other noise
                "sigma_w": [t.detach().cpu().clone() for t in self._sigma_w],
                "bank": self._bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.scale = float(state.get("scale", 1.0))
        for s, (_, m), d in zip(self._act, self.layers, state.get("act", [])):
            dev = m.weight.device  # checkpoints load on the CPU; the ranges live with their layer
            s.calls = int(d["calls"])
            s.xmin = d["xmin"].to(dev) if d["xmin"] is not None else None
            s.xmax = d["xmax"].to(dev) if d["xmax"] is not None else None
            if s.xmin is not None and s.xmax is not None:
                s.sigma = self._act_sigma(s.xmin, s.xmax)
        sigma_w = state.get("sigma_w", [])
        if len(sigma_w) == len(self._weights):
            self._sigma_w = [t.to(w.device, w.dtype) for t, w in zip(sigma_w, self._weights)]
        self._bank.load_state_dict(state.get("bank", {}))

    def __enter__(self) -> NoiseHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---- internals --------------------------------------------------------------------
    def _weight_sigma(self, w: torch.Tensor) -> torch.Tensor:
        # quant's own channel_absmax (abs + amax) is ~10x faster on CPU than an inf-norm reduction
        qp = quant.weight_qparams(w.detach(), self.config.w_bits)
        return qp.noise_std.mul_(self.config.noise_mult_w)

    def _act_sigma(self, xmin: torch.Tensor, xmax: torch.Tensor) -> torch.Tensor:
        qp = quant.activation_qparams(xmin, xmax, self.config.a_bits)
        return qp.noise_std.mul_(self.config.noise_mult_a)

    @torch.no_grad()
    def _perturb_weights(self) -> None:
        cfg = self.config
        if not self._sigma_w or (self.steps - 1) % cfg.w_stats_every == 0:
            self._sigma_w = [self._weight_sigma(w).to(w.dtype) for w in self._weights]
        torch._foreach_copy_(self._clean, self._weights)
        if cfg.bank:
            noise = [self._bank.take(w.numel(), w.dtype, w.device).view(w.shape) for w in self._weights]
        else:
            noise = [self._bank.fresh(w.shape, w.dtype, w.device) for w in self._weights]
        torch._foreach_addcmul_(self._weights, noise, self._sigma_w, value=self.scale)
        self._dirty = [True] * len(self._weights)

    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        self.restore()  # a forward pass without backward may have left noise behind
        if not module.training:
            return
        self.steps += 1
        if self.config.bank and self.steps > 1:
            self._bank.refresh()
        if self.config.weight_noise and self.scale > 0:
            self._perturb_weights()

    def _make_grad_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            if self._dirty[i]:
                with torch.no_grad():
                    param.copy_(self._clean[i])
                self._dirty[i] = False
        return hook

    def _state_dict_pre_hook(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        self.restore()

    def _make_act_hook(self, i: int):
        cfg = self.config
        state = self._act[i]
        keep = cfg.ema_momentum

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not module.training or self.scale == 0 or not args:
                return None
            x = args[0]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return None
            if state.sigma is None or state.calls % cfg.a_stats_every == 0:
                with torch.no_grad():
                    mn, mx = torch.aminmax(x.detach())
                    mn, mx = mn.float(), mx.float()
                    if state.xmin is None:
                        state.xmin, state.xmax = mn, mx
                    else:
                        state.xmin.lerp_(mn, 1.0 - keep)
                        state.xmax.lerp_(mx, 1.0 - keep)
                    state.sigma = self._act_sigma(state.xmin, state.xmax)
                    self._ranges_refreshed = True
            state.calls += 1
            if cfg.bank:
                noise = self._bank.take(x.numel(), x.dtype, x.device).view(x.shape)
            else:
                noise = self._bank.fresh(x.shape, x.dtype, x.device)
            # one fused kernel: x + scale * sigma * noise; d/dx is the identity
            return (torch.addcmul(x, noise, state.sigma, value=self.scale), *args[1:])

        return hook


def attach(model: nn.Module, config: NoiseConfig | dict[str, Any] | None = None, **overrides: Any) -> NoiseHandle:
    """Attach a noise pre-conditioner to ``model`` (in place); returns its handle.

    Args:
        model: any module with Linear/Conv layers (timm ViT, ResNet, small CNN).
        config: a :class:`NoiseConfig` or its dict; ``overrides`` replace single fields.

    Returns:
        A :class:`NoiseHandle`; ``handle.remove()`` (or leaving ``with attach(...)``)
        restores the original model exactly.

    Raises:
        ConfigError: invalid settings. ModelError: no Linear/Conv layer selected.
    """
    if config is None:
        config = NoiseConfig()
    elif isinstance(config, dict):
        config = NoiseConfig.from_dict(config)
    if overrides:
        config = NoiseConfig.from_dict({**config.to_dict(), **overrides})
    return NoiseHandle(model, config)
