"""Pre-conditioning methods: named ways of taking a training step, for ``workbench.train.fit``.

=========  =============================================================================
plain      one forward-backward pass, one optimizer step
wnoise     Gaussian weight noise, per output channel ``k_w * step_w / sqrt(12)`` (WQE model)
anoise     Gaussian activation noise on every Linear/Conv input, ``k_a * step_a / sqrt(12)``
dnq        both, independent (the paper's method)
uniform    pseudo-quantization noise: uniform on ``k * [-step/2, step/2]`` on weights and
           activations (as DiffQ/NIPQ do); the same variance as the Gaussian model at k=1
sam        sharpness-aware minimization: ascend to ``w + rho * g / ||g||``, take the gradient
           there, step from ``w`` (two forward-backward passes per step)
swa        stochastic weight averaging over the last epochs (``torch.optim.swa_utils``), then
           BatchNorm statistics recomputed on the training set where the model has BatchNorm
qat        quantization-aware training: fake-quantized forward passes at ``w_bits``/``a_bits``
           with learned steps (LSQ) and straight-through gradients (:mod:`workbench.lsq`)
=========  =============================================================================

>>> method = create_method(MethodConfig(method="dnq", w_bits=4, a_bits=8, noise_mult=1.0))
>>> fit(model, data, TrainConfig(), method, method_config=method.describe())

The training loop records the wall time of every epoch, so the cost of flatness is visible;
``benchmarks/bench_precondition.py`` measures the per-step cost side by side.

Under several processes (DDP, see :mod:`workbench.distributed`) every method gives what one
process with the same global batch gives: noise is drawn per rank (seed + rank), activation
ranges are synchronized after each refresh, weight-noise scales derive from the (identical)
weights; SAM's two passes both run through DDP, so the ascent direction comes from the
all-reduced gradient and the final gradient is all-reduced too (no ``no_sync``); SWA averages
the (identical) weights of every rank and recomputes BatchNorm statistics on the whole training
set on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from . import distributed as wdist
from .config import check_number
from .errors import ConfigError, UnknownNameError, WorkbenchWarning
from .noise import NoiseConfig, NoiseHandle, NoiseSites, attach, schedule_scale
from .registry import Registry
from .train_method import StepContext, TrainMethod

log = logging.getLogger(__name__)

#: name -> factory ``(MethodConfig) -> TrainMethod``
METHODS: Registry[Callable[[MethodConfig], TrainMethod]] = Registry("method")


@dataclass(frozen=True)
class MethodConfig(NoiseSites):
    """Settings of a pre-conditioning method; the same fields as the CLI flags and run metadata.

    The target bits and the noise's sites and schedule are :class:`~workbench.noise.NoiseSites`'
    fields (declared and checked there); :meth:`noise_config` turns them into the
    :class:`~workbench.noise.NoiseConfig` a noise method attaches."""

    KIND: ClassVar[str] = "method option"

    method: str = "plain"
    noise_mult: float = 1.0  # k for both noises, unless noise_mult_w / noise_mult_a are set
    noise_mult_w: float | None = None
    noise_mult_a: float | None = None
    rho: float = 0.05  # SAM neighbourhood radius (SAM paper's default)
    swa_start_frac: float = 0.75  # SWA averages the epochs after this fraction of training
    swa_epochs: int | None = None  # or: average exactly the last N epochs (overrides the fraction)
    swa_lr: float | None = None  # constant learning rate while averaging (None: keep the schedule)
    # or: average every N optimizer steps from the start fraction on (a 1-epoch fine-tune has one
    # epoch end, so per-epoch averaging would average nothing but the last weights)
    swa_every: int | None = None
    seed: int | None = None  # noise seed; None: the training seed (torch.initial_seed()); + rank under DDP

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnknownNameError(METHODS.unknown_message(str(self.method)))
        super().__post_init__()  # bits, sites, schedule
        check_number("noise_mult", self.noise_mult)
        check_number("noise_mult_w", self.noise_mult_w, allow_none=True)
        check_number("noise_mult_a", self.noise_mult_a, allow_none=True)
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho > 0:
            raise ConfigError(f"rho must be a number > 0, got {self.rho!r}")
        if not 0.0 <= self.swa_start_frac < 1.0:
            raise ConfigError(f"swa_start_frac must be in [0, 1), got {self.swa_start_frac!r}")
        if self.swa_epochs is not None and int(self.swa_epochs) < 1:
            raise ConfigError(f"swa_epochs must be >= 1, got {self.swa_epochs!r}")
        if self.swa_lr is not None and not self.swa_lr > 0:
            raise ConfigError(f"swa_lr must be > 0, got {self.swa_lr!r}")
        if self.swa_every is not None and int(self.swa_every) < 1:
            raise ConfigError(f"swa_every must be >= 1 (optimizer steps between averaged weights), got {self.swa_every!r}")
        needs = {"wnoise": ("w_bits",), "anoise": ("a_bits",), "dnq": ("w_bits", "a_bits")}.get(self.method, ())
        for name in needs:
            if getattr(self, name) is None:
                raise ConfigError(f"method {self.method!r} needs {name} (bits from 2 to 16), got None "
                                  f"(32 = not quantized)")
        if self.method in ("uniform", "qat") and self.w_bits is None and self.a_bits is None:
            raise ConfigError(f"method {self.method!r} needs w_bits and/or a_bits")

    @property
    def k_w(self) -> float:
        return float(self.noise_mult if self.noise_mult_w is None else self.noise_mult_w)

    @property
    def k_a(self) -> float:
        return float(self.noise_mult if self.noise_mult_a is None else self.noise_mult_a)

    def noise_config(self, seed: int = 0) -> NoiseConfig:
        """The :class:`NoiseConfig` this method attaches (weights/activations per method)."""
        weights = self.method in ("wnoise", "dnq", "uniform")
        acts = self.method in ("anoise", "dnq", "uniform")
        sites = {f.name: getattr(self, f.name) for f in fields(NoiseSites)}
        sites.update(w_bits=self.w_bits if weights else None, a_bits=self.a_bits if acts else None)
        return NoiseConfig(**sites, noise_mult_w=self.k_w, noise_mult_a=self.k_a,
                           distribution="uniform" if self.method == "uniform" else "gaussian",
                           seed=self.seed if self.seed is not None else seed)


def create_method(config: MethodConfig | dict[str, Any] | str) -> TrainMethod:
    """A :class:`~workbench.train_method.TrainMethod` for a config, its dict, or a method name.

    Raises:
        UnknownNameError: unknown method (the message lists the valid names).
        ConfigError: invalid settings.
    """
    if isinstance(config, str):
        config = MethodConfig(method=config)
    elif isinstance(config, dict):
        config = MethodConfig.from_dict(config)
    elif not isinstance(config, MethodConfig):
        raise ConfigError(f"expected a MethodConfig, dict or name, got {type(config).__name__}")
    return METHODS.get(config.method)(config)


def list_methods() -> list[str]:
    return METHODS.names()


# ---- plain -------------------------------------------------------------------------------
class PlainMethod(TrainMethod):
    """Plain training (the base class), recording its config."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.name = config.method

    def describe(self) -> dict[str, Any]:
        return self.config.to_dict()


METHODS.register("plain", PlainMethod, help="plain training: one forward-backward pass per step")


# ---- noise methods ------------------------------------------------------------------------
class NoiseMethod(PlainMethod):
    """Training with a :mod:`workbench.noise` pre-conditioner attached (wnoise/anoise/dnq/uniform)."""

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.handle: NoiseHandle | None = None
        self.step = 0
        self.steps_per_epoch = 1
        self._pending_state: dict[str, Any] | None = None

    def setup(self, model: nn.Module, ctx: StepContext) -> None:
        if self.handle is not None:
            self.handle.remove()
        # torch.initial_seed() is already seed + rank (fit seeds each rank so); an explicit seed gets + rank here
        noise = self.config.noise_config(seed=torch.initial_seed() % (2**31))
        if self.config.seed is not None and wdist.seed_offset():
            noise = replace(noise, seed=noise.seed + wdist.seed_offset())
        self.handle = attach(model, noise)
        self.steps_per_epoch = max(1, ctx.steps_per_epoch)
        if self._pending_state is not None:
            self.handle.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.step = max(self.step, epoch * self.steps_per_epoch)  # also right after a resume

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      ctx: StepContext) -> torch.Tensor:
        handle = self.handle
        if handle is None:
            raise ConfigError(f"method {self.name!r}: setup() was not called before training_step()")
        handle.set_scale(schedule_scale(handle.config, self.step, self.steps_per_epoch))
        ctx.optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss = ctx.loss_fn(model(images), labels)  # the root hook perturbs the weights first
        loss.backward()  # each weight is restored as soon as its gradient is complete
        handle.restore()  # weights without a gradient (frozen, unused) too
        ctx.clip(model)
        ctx.optimizer.step()
        handle.sync_ranges()  # several processes: one all-reduce after each range refresh
        self.step += 1
        return loss.detach()

    def finalize(self, model: nn.Module, ctx: StepContext) -> None:
        """The noise off, and BatchNorm statistics estimated again on clean training images.

        BatchNorm's running statistics were gathered while the noise was on, so they hold the
        noise's variance too. Evaluated without noise, the model would be normalized wrongly: on
        ``cnn-small`` that cost 3 points of full-precision accuracy, all recovered by estimating
        the statistics again (the fine-tune study, docs/results.md). ``vit-micro`` has two
        BatchNorms too, in its convolutional stem, so its noise fine-tunes change with this; a
        model with LayerNorm only keeps no running statistics and is unchanged."""
        if self.handle is not None:
            self.handle.remove()  # before the pass below: it must see the clean model
            self.handle = None
        recompute_bn(model, ctx, self.name)

    def teardown(self, model: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def state_dict(self) -> dict[str, Any]:
        state = self.handle.state_dict() if self.handle is not None else (self._pending_state or {})
        return {**state, "method_step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("method_step", 0))
        if self.handle is not None:
            self.handle.load_state_dict(state)
        else:
            self._pending_state = dict(state)

    def describe(self) -> dict[str, Any]:
        d = self.config.to_dict()
        nc = self.config.noise_config()
        d["noise"] = {"weights": nc.weight_noise, "activations": nc.act_noise,
                      "distribution": nc.distribution}
        return d


for _name, _help in [
    ("wnoise", "Gaussian weight noise k_w*step_w/sqrt(12) per output channel (WQE only)"),
    ("anoise", "Gaussian activation noise k_a*step_a/sqrt(12) per tensor (AQE only)"),
    ("dnq", "independent Gaussian weight and activation noise (the DNQ paper)"),
    ("uniform", "uniform pseudo-quantization noise of the quantizer step (DiffQ/NIPQ style)"),
]:
    METHODS.register(_name, NoiseMethod, help=_help)


# ---- QAT ----------------------------------------------------------------------------------
class QATMethod(PlainMethod):
    """Quantization-aware training: fake-quantized forward passes with learned steps (LSQ).

    Weights per output channel and Linear/Conv inputs per tensor at ``w_bits``/``a_bits``, the
    PTQ engine's grids (:mod:`workbench.lsq`). The trained model keeps its quantizers: it is
    evaluated, saved and reloaded as the quantized model it learned to be; its full-precision
    accuracy (latent weights, float inputs) is reported beside it. The attention matmul inputs
    (q, k, v, softmax) stay in float, as LayerNorm, GELU and softmax do.
    """

    def prepare(self, model: nn.Module) -> None:
        from . import lsq

        if lsq.has_quantizers(model):
            return  # a resumed run or a reloaded QAT model: its quantizers are already there
        names = lsq.attach(model, self.config.w_bits, self.config.a_bits, self.config.include, self.config.exclude)
        if not names:
            raise ConfigError(f"method 'qat': no Linear/Conv layer matches include={list(self.config.include)} "
                              f"exclude={list(self.config.exclude)}")
        log.info("qat: %d layers quantized (W%s A%s, learned steps)", len(names), self.config.w_bits or 32,
                 self.config.a_bits or 32)

    def full_precision(self, model: nn.Module):
        from . import lsq

        return lsq.disabled(model)


METHODS.register("qat", QATMethod, help="quantization-aware training at w_bits/a_bits with learned steps (LSQ)")


# ---- SAM ----------------------------------------------------------------------------------
def sam_perturbation(grads: list[torch.Tensor], rho: float, eps: float = 1e-12) -> list[torch.Tensor]:
    """SAM's first-order worst-case perturbation ``e = rho * g / ||g||`` (global L2 norm)."""
    if not grads:
        return []
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch._foreach_mul(grads, rho / (norm + eps))


class SAMMethod(PlainMethod):
    """Sharpness-aware minimization (Foret et al.): two forward-backward passes per step.

    BatchNorm running statistics are saved before the second pass and put back after it,
    so they are updated once per step, as in plain training. Under DDP both backward passes
    all-reduce: the perturbation ``rho * g / ||g||`` uses the global-batch gradient, as one
    process would (``no_sync`` on the first pass would give per-rank perturbations: m-SAM).
    """

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self._clean: list[torch.Tensor] | None = None

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      ctx: StepContext) -> torch.Tensor:
        opt = ctx.optimizer
        opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss = ctx.loss_fn(model(images), labels)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            raise ConfigError("SAM: no parameter received a gradient")
        with torch.no_grad():
            if self._clean is None or len(self._clean) != len(params) or any(
                    c.shape != p.shape for c, p in zip(self._clean, params)):
                self._clean = [torch.empty_like(p) for p in params]
            torch._foreach_copy_(self._clean, params)
            e = sam_perturbation([p.grad for p in params], self.config.rho)
            torch._foreach_add_(params, e)
        bn_state = _save_bn(model)
        opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            ctx.loss_fn(model(images), labels).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, self._clean)  # exact, unlike subtracting e again
        _load_bn(model, bn_state)
        ctx.clip(model)
        opt.step()
        return loss.detach()


def recompute_bn(model: nn.Module, ctx: StepContext, who: str, why: str = "its statistics hold the training "
                 "noise") -> None:
    """Estimate the BatchNorm running statistics again, over the training images as they are
    (``torch.optim.swa_utils.update_bn``: cumulative averages, the model in train mode, restored
    after); a no-op without BatchNorm. Without training batches a warning says what is left wrong."""
    if not _bn_modules(model):
        return
    if ctx.train_batches is None:
        import warnings

        warnings.warn(f"{who}: the model has BatchNorm but no training batches were given; {why}",
                      WorkbenchWarning, stacklevel=3)
        return
    torch.optim.swa_utils.update_bn(ctx.train_batches(), model, device=ctx.device)


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _save_bn(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    return [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in _bn_modules(model)
            if m.training and m.track_running_stats]


def _load_bn(model: nn.Module, saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    with torch.no_grad():
        for m, bufs in saved:
            for k, b in bufs.items():
                getattr(m, k).copy_(b)


METHODS.register("sam", SAMMethod, help="sharpness-aware minimization (rho), two passes per step")


# ---- SWA ----------------------------------------------------------------------------------
class SWAMethod(PlainMethod):
    """Stochastic weight averaging over the last epochs, then BatchNorm statistics recomputed.

    Averaging starts at epoch ``floor(epochs * swa_start_frac)`` (or ``epochs - swa_epochs``)
    and adds the weights at the end of each epoch from there on. With ``swa_every`` it starts at
    optimizer step ``floor(total_steps * swa_start_frac)`` and adds the weights after every
    ``swa_every``-th step from there on: the form a short fine-tune needs. With ``swa_lr`` the
    learning rate is held at that value while averaging (set before every optimizer step, so it
    wins over the loop's schedule).
    """

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.avg: torch.optim.swa_utils.AveragedModel | None = None
        self.start_epoch = 0
        self.epoch = 0
        self.n_averaged = 0
        self.step = 0  # optimizer steps taken (swa_every)
        self.start_step = 0

    def setup(self, model: nn.Module, ctx: StepContext) -> None:
        cfg = self.config
        if cfg.swa_epochs is not None:
            self.start_epoch = max(0, ctx.epochs - int(cfg.swa_epochs))
        else:
            self.start_epoch = min(ctx.epochs - 1, int(math.floor(ctx.epochs * cfg.swa_start_frac)))
        self.avg = torch.optim.swa_utils.AveragedModel(model)
        if cfg.swa_every is not None:
            total = ctx.total_steps if ctx.total_steps is not None else ctx.epochs * ctx.steps_per_epoch
            self.start_step = (max(0, total - int(cfg.swa_epochs) * ctx.steps_per_epoch) if cfg.swa_epochs is not None
                               else min(total - 1, int(math.floor(total * cfg.swa_start_frac))))
            log.info("SWA averages every %d steps after step %d of %d", cfg.swa_every, self.start_step, total)
        else:
            log.info("SWA averages epochs %d..%d", self.start_epoch + 1, ctx.epochs)

    def _averaging(self) -> bool:
        return (self.step >= self.start_step) if self.config.swa_every is not None else self.epoch >= self.start_epoch

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.epoch = epoch

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      ctx: StepContext) -> torch.Tensor:
        if self.config.swa_lr is not None and self._averaging():
            for group in ctx.optimizer.param_groups:
                group["lr"] = self.config.swa_lr
        loss = super().training_step(model, images, labels, ctx)
        every = self.config.swa_every
        if every is not None:
            self.step += 1
            if self.avg is not None and self.step > self.start_step and (self.step - self.start_step) % every == 0:
                self.avg.update_parameters(model)
                self.n_averaged += 1
        return loss

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if self.config.swa_every is None and self.avg is not None and epoch >= self.start_epoch:
            self.avg.update_parameters(model)
            self.n_averaged += 1

    def finalize(self, model: nn.Module, ctx: StepContext) -> None:
        if self.avg is None or self.n_averaged == 0:
            log.warning("SWA: no epoch was averaged; keeping the last weights")
            return
        with torch.no_grad():
            for p, q in zip(model.parameters(), self.avg.module.parameters()):
                p.copy_(q)
        recompute_bn(model, ctx, "SWA", why="its statistics belong to the last weights, not the average")
        log.info("SWA: averaged %d %s", self.n_averaged, "snapshots" if self.config.swa_every else "epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"avg": self.avg.state_dict() if self.avg is not None else None, "n_averaged": self.n_averaged,
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_averaged = int(state.get("n_averaged", 0))
        self.step = int(state.get("step", 0))
        if self.avg is not None and state.get("avg") is not None:
            self.avg.load_state_dict(state["avg"])

    def describe(self) -> dict[str, Any]:
        return self.config.to_dict()


METHODS.register("swa", SWAMethod, help="stochastic weight averaging over the last epochs (+ BN update)")
