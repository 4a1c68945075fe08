"""The training loop: ``fit(model, data, config, method)``.

``fit`` owns what every method shares (data order, optimizer, warm-up + cosine schedule,
label smoothing, mixed precision on CUDA, evaluation each epoch, checkpoints, progress,
divergence checks, Ctrl-C handling); a :class:`~workbench.train_method.TrainMethod` owns what
differs between pre-conditioning methods (see :mod:`workbench.train_method`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) ``fit`` trains data-parallel with
``DistributedDataParallel``: ``batch_size`` stays the global batch, each rank takes its slice
of it, BatchNorm uses global-batch statistics, metrics are reduced over the ranks and only
rank 0 writes files and shows progress (see :mod:`workbench.distributed`, docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as wdist
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigBase
from .data import DataBundle, batches, num_batches
from .errors import CheckpointError, ConfigError, TrainingDivergedError
from .interrupt import DeferredInterrupt
from .runinfo import model_device, progress_bar, resolve_device, run_metadata, write_csv, write_json
from .train_method import StepContext, TrainMethod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Optimisation recipe. Defaults are the measured recipe for ``vit-micro`` on
    ``fashion-mnist-mini`` (see benchmarks/bench_train.py); they also suit ``cnn-small``."""

    epochs: float = 14                # vit-micro: 84 % on fashion-mnist-mini in ~3 min on 2 CPU cores;
                                      # a fraction trains that part of the last epoch (fine-tunes: 0.5)
    steps: int | None = None          # total optimizer steps, instead of epochs (fine-tunes)
    batch_size: int = 128             # the global batch: split over the processes under torchrun
    optimizer: str = "adamw"          # adamw | sgd
    lr: float = 2e-3                  # peak learning rate after warm-up
    weight_decay: float = 0.05        # not applied to biases, norms, positional embeddings
    momentum: float = 0.9             # sgd only
    warmup_epochs: float = 1.0        # linear warm-up, then cosine decay to min_lr
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    augment: bool = True              # random crop with padding (+ flip where labels allow)
    grad_clip: float | None = 1.0     # max global grad norm; None = off
    seed: int = 0                     # fixes data order, augmentation and noise
    device: str = "auto"              # auto | cpu | cuda
    amp: bool = True                  # bf16 autocast, CUDA only
    eval_batch_size: int = 512

    KIND: ClassVar[str] = "training option"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) \
                or not math.isfinite(self.epochs) or self.epochs <= 0:
            raise ConfigError(f"epochs must be a number > 0 (a fraction trains part of an epoch), got {self.epochs!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ConfigError(f"steps must be a whole number >= 1 (or None: train for `epochs`), got {self.steps!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: use 'adamw' or 'sgd'")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.label_smoothing < 1 or self.warmup_epochs < 0:
            raise ConfigError("weight_decay and warmup_epochs must be >= 0 and label_smoothing in [0, 1)")


@dataclass
class TrainResult:
    """What ``fit`` returns: the history rows, final metrics and where things were saved."""

    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    out_dir: Path | None = None
    checkpoint: Path | None = None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices/kernels only; the model may name more exclusions (timm's
    ``no_weight_decay``, e.g. positional embeddings)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` (per optimizer step)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batch_iter: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: str | torch.device | None = None, *, all_ranks: bool = False) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy (percent) over batches; restores the model's mode.

    With ``all_ranks`` (and a process group) each rank passes its own batches and the sums are
    reduced over the ranks: every rank returns the metrics of the union.
    """
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else model_device(model)
    total_loss, correct, n = 0.0, 0, 0
    try:
        for x, y in batch_iter:
            x, y = x.to(dev), y.to(dev)
            logits = model(x).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    finally:
        model.train(was_training)
    if all_ranks and wdist.is_distributed():
        total_loss, correct, n = wdist.all_reduce_values([total_loss, correct, n])
        correct, n = int(round(correct)), int(round(n))
    if n == 0:
        raise ConfigError("evaluate got no batches: the split is empty")
    return {"loss": total_loss / n, "accuracy": 100.0 * correct / n, "n": n}


def evaluate_split(model: nn.Module, data: DataBundle, split: str = "test", batch_size: int = 512,
                   device: str | torch.device | None = None, *, shard: bool = False) -> dict[str, float]:
    """:func:`evaluate` on a named split of a :class:`DataBundle`.

    With ``shard`` (and a process group; every rank must call it) each rank evaluates its share of
    every batch and the metrics are reduced over the ranks.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    rank, world = (wdist.get_rank(), wdist.get_world_size()) if shard else (0, 1)
    it = batches(data.split(split), data.info, batch_size, device=dev, rank=rank, world_size=world)
    return evaluate(model, it, dev, all_ranks=shard)


def fit(model: nn.Module, data: DataBundle, config: TrainConfig | None = None,
        method: TrainMethod | None = None, *, method_config: dict[str, Any] | None = None,
        out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
        init: dict[str, Any] | None = None) -> TrainResult:
    """Train ``model`` on ``data.train``, evaluating on ``data.test`` (and ``data.val``) each epoch.

    Args:
        config: the optimisation recipe (default :class:`TrainConfig`).
        method: a pre-conditioning method (default: plain training).
        method_config: the method's settings as a dict, recorded in checkpoints.
        out_dir: where ``last.pt`` (each epoch, and on Ctrl-C), ``model.pt``, ``history.json/csv``
            and ``run.json`` go. The folder must be prepared by the caller
            (:func:`workbench.runinfo.prepare_run_dir` refuses to overwrite).
        resume: continue from ``out_dir/last.pt`` (same data order as an uninterrupted run).
        callbacks: called with each epoch's history row (e.g. the live training monitor); on rank 0 only.
        init: where ``model``'s starting weights came from, for a fine-tune (see
            :func:`workbench.zoo.load_init`: source, sha256, the parent's metrics); recorded in
            ``run.json`` (``params.init``) and the checkpoints. The run is a new run with its own
            optimizer and schedule, not a resume.

    Several processes (``torchrun``; the process group is initialized from the environment
    unless the caller did): every rank calls ``fit`` with the same arguments and the same initial
    weights (rank 0's are broadcast anyway). ``config.batch_size`` is the global batch and must be
    divisible by the number of processes; rank ``r`` trains on its slice of every global batch
    with noise and dropout seeded ``seed + r``. Gradients are averaged by
    ``DistributedDataParallel``, BatchNorm normalizes with global-batch statistics, losses and
    accuracies are reduced over the ranks, and only rank 0 writes ``out_dir`` and shows progress.
    Every rank returns the same history and metrics (``epoch_time`` is each rank's own).

    Raises:
        TrainingDivergedError: the loss became NaN/inf (names epoch and step).
        KeyboardInterrupt: after saving ``last.pt`` so that ``resume`` can continue.
        ConfigError: under several processes, ``batch_size`` not divisible by their number, or a
            process group that cannot be initialized.
    """
    cfg = config or TrainConfig()
    method = method or TrainMethod()
    method_config = method_config or method.describe()
    device = resolve_device(cfg.device)
    wdist.init_from_env(device)  # no-op in one process, or when the caller made the group
    world, rank, main = wdist.get_world_size(), wdist.get_rank(), wdist.is_main()
    device = wdist.local_device(device)
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(device)  # collectives of made-up tensors use the current device
    wdist.check_global_batch(cfg.batch_size)
    out = Path(out_dir) if out_dir is not None else None
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")

    steps_per_epoch = num_batches(data.train, cfg.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({len(data.train)})")
    total_steps = cfg.steps if cfg.steps is not None else int(round(cfg.epochs * steps_per_epoch))
    if total_steps < 1:
        raise ConfigError(f"epochs={cfg.epochs} is less than one step of {steps_per_epoch} per epoch: "
                          "give more epochs or --steps N")
    n_epochs = math.ceil(total_steps / steps_per_epoch)  # the last one may be partial
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    method.prepare(model)  # e.g. QAT's learned steps: in the optimizer, DDP and the checkpoints
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr / cfg.lr))
    use_amp = cfg.amp and device.type == "cuda"

    def autocast():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)

    seed = cfg.seed + wdist.seed_offset()  # seed + rank: independent, reproducible streams per rank
    gen = torch.Generator(device=device).manual_seed(seed)
    ctx = StepContext(
        loss_fn=loss_fn, optimizer=optimizer, device=device, epochs=n_epochs,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, grad_clip=cfg.grad_clip, autocast=autocast,
        # the whole training set on every rank (SWA's BatchNorm update: identical to one process)
        train_batches=lambda: batches(data.train, data.info, cfg.eval_batch_size, device=device),
        generator=gen,
    )
    history: list[dict[str, Any]] = []
    start_epoch, start_batch = 0, 0
    # noise and dropout streams: same seed, same run. A resumed run seeds alike (methods derive
    # their noise seed from it in setup) and then puts back the generators' saved states.
    torch.manual_seed(seed)
    resume_state: dict[str, Any] | None = None
    if resume:
        if out is None:
            raise ConfigError("resume needs out_dir (the folder holding last.pt)")
        if not main and not (out / "last.pt").is_file():
            raise CheckpointError(f"rank {rank} cannot see {out / 'last.pt'}: to resume on several nodes, "
                                  "the run folder must be on a file system every node shares")
        ckpt = load_checkpoint(out / "last.pt")
        _check_resume(ckpt, cfg, model)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = ckpt["progress"]["epoch"]
        start_batch = ckpt["progress"].get("step_in_epoch", 0)
        history = list(ckpt["extra"].get("history", []))
        resume_state = _rank_resume_state(ckpt, world, rank)
        if resume_state is None:  # an older checkpoint, or another number of processes
            torch.manual_seed(seed + 7919 * (start_epoch * steps_per_epoch + start_batch))
        log.info("resuming at epoch %d, batch %d", start_epoch, start_batch)

    meta = run_metadata({"data": data.params, "train": cfg.to_dict(), "method": method_config,
                         "model": getattr(model, "workbench_spec", {}), "init": init})
    if world > 1:
        meta["distributed"] = {"world_size": world, "backend": wdist.get_backend(),
                               "per_rank_batch_size": cfg.batch_size // world}
    if out is not None and not resume and main:
        write_json(out / "run.json", meta)

    loss_sum = torch.zeros((), device=device)  # the current epoch's summed step losses (this rank)
    n_steps = 0

    def save_last(epoch: int, step_in_epoch: int, interrupted: bool) -> None:
        if out is None:
            return
        # every rank's own streams (dropout, noise) and partial epoch loss, so that a resume on
        # as many processes continues bit for bit; a collective, so every rank takes part
        states = wdist.gather_to_main(_capture_rank_state(method, gen, device, loss_sum, n_steps))
        if not main:
            return
        save_checkpoint(out / "last.pt", model, data_info=data.info.to_dict(), train_config=cfg.to_dict(),
                        method_config=method_config, metrics=history[-1] if history else {},
                        progress={"epoch": epoch, "step_in_epoch": step_in_epoch, "interrupted": interrupted},
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        method_state=states[0]["method"],
                        extra={"history": history, "rank_states": states, "init": init})

    bar = progress_bar(total_steps, "train", progress and main, initial=start_epoch * steps_per_epoch + start_batch,
                       unit="step", leave=True)
    model.train()
    method.setup(model, ctx)
    epoch, step_in_epoch = start_epoch, start_batch
    resume_at = (start_epoch, start_batch)  # the last step boundary: where a saved run continues
    shard = world > 1
    ddp_scope = contextlib.ExitStack()  # global-batch BatchNorm while training under DDP
    train_model = model  # what training_step runs: the DDP wrapper under several processes
    # Ctrl-C stops between two steps; several processes agree on the step (one small all-reduce)
    interrupt = DeferredInterrupt(sync=(lambda flag: wdist.all_reduce_values([flag], "max")[0] > 0)
                                  if world > 1 else None)
    try:
        interrupt.__enter__()
        if resume_state is not None:
            method.load_state_dict(resume_state["method"])
            _restore_rank_state(resume_state, gen, device)
            loss_sum.fill_(resume_state["loss_sum"].item())
            n_steps = int(resume_state["n_steps"])
        elif resume and "method_state" in ckpt:  # rank 0's; its noise stream must not be every rank's
            method.load_state_dict({k: v for k, v in ckpt["method_state"].items() if k != "bank"})
        if world > 1:
            train_model = _wrap_ddp(model, device, ddp_scope)
        for epoch in range(start_epoch, n_epochs):
            method.on_epoch_start(model, epoch)
            model.train()
            t0 = time.perf_counter()
            first = start_batch if epoch == start_epoch else 0
            if epoch != start_epoch or resume_state is None:
                loss_sum.zero_()
                n_steps = 0
            step_in_epoch = first
            for x, y in batches(data.train, data.info, cfg.batch_size, shuffle=True, augment=cfg.augment,
                                device=device, seed=cfg.seed, epoch=epoch, drop_last=True, start_batch=first,
                                rank=rank, world_size=world):
                if epoch * steps_per_epoch + step_in_epoch >= total_steps:
                    break  # a partial last epoch (fractional epochs or --steps)
                interrupt.check()  # a step boundary: everything saved here resumes exactly
                loss = method.training_step(train_model, x, y, ctx)
                if not torch.isfinite(loss):
                    gstep = epoch * steps_per_epoch + step_in_epoch
                    raise TrainingDivergedError(
                        f"training loss became {loss.item()} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                        f"(global step {gstep + 1}); lower the learning rate (--lr) or the noise multiplier, "
                        "or enable gradient clipping", epoch=epoch, step=gstep, loss=float(loss.item()))
                scheduler.step()
                loss_sum += loss
                n_steps += 1
                step_in_epoch += 1
                resume_at = (epoch, step_in_epoch)
                bar.update(1)
                if n_steps % 10 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - t0
            if shard:
                wdist.all_reduce_(loss_sum, "mean")  # every rank's steps count alike (equal shards)
            method.on_epoch_end(model, epoch)
            row = {"epoch": epoch + 1, "train_loss": (loss_sum / max(1, n_steps)).item(),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_time": epoch_time,
                   "step_time": epoch_time / max(1, n_steps), "method": method_config.get("method", method.name)}
            t1 = time.perf_counter()
            ev = evaluate_split(model, data, "test", cfg.eval_batch_size, device, shard=shard)
            row.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
            if len(data.val):
                ev = evaluate_split(model, data, "val", cfg.eval_batch_size, device, shard=shard)
                row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
            row["eval_time"] = time.perf_counter() - t1
            history.append(row)
            bar.set_postfix(epoch=epoch + 1, loss=f"{row['train_loss']:.3f}", acc=f"{row['test_accuracy']:.1f}")
            for cb in callbacks if main else ():
                cb(row)
            step_in_epoch = 0
            loss_sum.zero_()
            n_steps = 0
            resume_at = (epoch + 1, 0)
            save_last(epoch + 1, 0, interrupted=False)
            interrupt.check()  # asked during the evaluation: stop here, at the epoch's checkpoint
        ddp_scope.close()  # plain BatchNorm again: SWA recomputes statistics on the whole set on every rank
        method.finalize(model, ctx)
    except KeyboardInterrupt:
        if interrupt.torn:  # stopped inside a step: keep the last consistent last.pt
            if main:
                log.warning("stopped inside a step: %s is the last consistent state; continue with resume",
                            out / "last.pt" if out else "nothing")
        else:
            save_last(*resume_at, interrupted=True)
            if main:
                log.warning("interrupted: saved %s; continue with resume", out / "last.pt" if out else "nothing")
        bar.close()
        raise
    finally:
        interrupt.__exit__(None, None, None)
        ddp_scope.close()
        del train_model  # the DDP wrapper (and its gradient hooks) goes with it
        method.teardown(model)
        bar.close()

    final = evaluate_split(model, data, "test", cfg.eval_batch_size, device, shard=shard)
    metrics = {"test_loss": final["loss"], "test_accuracy": final["accuracy"],
               "epochs": cfg.epochs, "steps": total_steps, "mean_epoch_time": sum(r["epoch_time"] for r in history) / max(1, len(history)),
               "total_train_time": sum(r["epoch_time"] for r in history), "device": str(device)}
    full_precision = method.full_precision(model)
    if full_precision is not None:  # a quantized model (QAT): its latent weights in float, too
        with full_precision:
            ev = evaluate_split(model, data, "test", cfg.eval_batch_size, device, shard=shard)
        metrics.update(fp_test_loss=ev["loss"], fp_test_accuracy=ev["accuracy"])
    if world > 1:
        metrics["world_size"] = world
    if len(data.val):
        ev = evaluate_split(model, data, "val", cfg.eval_batch_size, device, shard=shard)
        metrics.update({f"val_{k}": v for k, v in ev.items() if k in ("loss", "accuracy")})
    result = TrainResult(history=history, metrics=metrics, out_dir=out)
    if out is not None:
        if main:
            save_checkpoint(out / "model.pt", model, data_info=data.info.to_dict(),
                            train_config=cfg.to_dict(), method_config=method_config,
                            metrics=metrics, progress={"epoch": n_epochs, "steps": total_steps},
                            extra={"history": history, "init": init})
            write_json(out / "history.json", history)
            write_csv(out / "history.csv", history)
            write_json(out / "metrics.json", metrics)
            write_json(out / "run.json", {**meta, "metrics": metrics})
        result.checkpoint = out / "model.pt"
    wdist.barrier()  # every rank returns once rank 0's files are written
    return result


def _wrap_ddp(model: nn.Module, device: torch.device, scope: contextlib.ExitStack) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` with global-batch BatchNorm (undone when ``scope`` closes).

    Buffers are not broadcast each step: with synchronized BatchNorm they are equal on every rank
    by construction (rank 0's parameters and buffers are broadcast once, here).
    """
    from torch.nn.parallel import DistributedDataParallel

    n_bn = scope.enter_context(wdist.sync_batchnorm(model))
    # Convolutions over 1-channel images get gradients whose stride on the size-1 input-channel
    # dimension differs from the weight's; DDP then copies (a few hundred numbers) and warns.
    scope.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    # newer torch renames broadcast_buffers (and warns); both still sync buffers once at construction
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    log.info("DistributedDataParallel over %d processes (%s), %d BatchNorm layer(s) on global-batch statistics",
             wdist.get_world_size(), wdist.get_backend(), n_bn)
    return ddp


def _capture_rank_state(method: TrainMethod, gen: torch.Generator, device: torch.device,
                        loss_sum: torch.Tensor, n_steps: int) -> dict[str, Any]:
    """What one rank needs, beyond the shared weights and optimizer, to continue bit for bit."""
    state = {"torch_rng": torch.get_rng_state(), "generator": gen.get_state(),
             "method": method.state_dict(), "loss_sum": loss_sum.detach().cpu().clone(), "n_steps": n_steps}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _rank_resume_state(ckpt: dict[str, Any], world: int, rank: int) -> dict[str, Any] | None:
    states = ckpt.get("extra", {}).get("rank_states")
    if not states:
        log.warning("last.pt predates exact resume: the run continues with fresh random streams")
        return None
    if len(states) != world:
        log.warning("last.pt was written by %d process(es), this run has %d: the data shards and random "
                    "streams differ, so the run continues equivalently but not bit for bit", len(states), world)
        return None
    return states[rank]


def _restore_rank_state(state: dict[str, Any], gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    gen.set_state(state["generator"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _check_resume(ckpt: dict[str, Any], cfg: TrainConfig, model: nn.Module) -> None:
    from .checkpoint import check_compatible

    check_compatible(ckpt, model, source="last.pt")
    saved = dict(ckpt.get("train_config", {}))
    now = cfg.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k != "device" and saved.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"cannot resume with a different recipe: {diff} (saved vs now); "
                              "resume with the original options")
