"""The training loop's extension point: a ``TrainMethod`` decides how one step is done.

:func:`workbench.train.fit` owns data order, the optimizer, the schedule, evaluation,
checkpoints and progress. A method owns what differs between pre-conditioning methods:
noise attached to the model, a second forward-backward pass (SAM), a running weight
average (SWA). The plain method is this base class.

Lifecycle, as called by ``fit``::

    method.prepare(model)                    # once, before the optimizer exists (QAT's quantizers)
    method.setup(model, ctx)                 # once, before the first step (also on resume)
    for epoch ...:
        method.on_epoch_start(model, epoch)
        for batch ...:
            loss = method.training_step(model, images, labels, ctx)
        method.on_epoch_end(model, epoch)
    method.finalize(model, ctx)              # e.g. SWA: swap in the average, recompute BN
    method.teardown(model)                   # always (finally): detach hooks, restore model

Under several processes ``training_step`` receives the ``DistributedDataParallel`` wrapper
(its forward and backward synchronize: call them as usual, each forward followed by its
backward; its ``parameters()`` are the model's) and its rank's shard of the global batch; every
other hook receives the bare model, so hooks, copies and state dicts see the usual names.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn


@dataclass
class StepContext:
    """What a method needs from the loop to take a step."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    device: torch.device
    epochs: int
    steps_per_epoch: int
    total_steps: int | None = None  # optimizer steps in all (fractional epochs, --steps); None: epochs x steps_per_epoch
    grad_clip: float | None = None
    autocast: Callable[[], AbstractContextManager] = nullcontext
    #: Yields (images, labels) batches of the training set without augmentation,
    #: for methods that must recompute statistics (SWA's BatchNorm update).
    train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def clip(self, model: nn.Module) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)


class TrainMethod:
    """Plain training: one forward-backward pass and one optimizer step per batch."""

    name = "plain"

    def prepare(self, model: nn.Module) -> None:
        """Add the method's own trainable parameters to the model, as sub-modules, before the
        optimizer is made: the optimizer, ``DistributedDataParallel`` and the checkpoints then
        hold them like any weight (QAT's learned steps). Plain training adds nothing."""

    def full_precision(self, model: nn.Module) -> AbstractContextManager | None:
        """A context in which ``model`` computes in full precision, for a method whose trained
        model is itself quantized (QAT): ``fit`` then reports that accuracy too. None: it is FP."""
        return None

    def setup(self, model: nn.Module, ctx: StepContext) -> None:
        """Attach whatever the method needs (hooks, averaged copies)."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called before each epoch (0-based), e.g. to advance a noise schedule."""

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      ctx: StepContext) -> torch.Tensor:
        """One optimisation step; returns the (detached) training loss of the batch."""
        ctx.optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss = ctx.loss_fn(model(images), labels)
        loss.backward()
        ctx.clip(model)
        ctx.optimizer.step()
        return loss.detach()

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after each epoch (0-based)."""

    def finalize(self, model: nn.Module, ctx: StepContext) -> None:
        """Called once after the last epoch, before the final evaluation."""

    def teardown(self, model: nn.Module) -> None:
        """Always called at the end of ``fit`` (also on errors): undo ``setup``."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors/plain values needed to resume (saved inside checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def describe(self) -> dict[str, Any]:
        """Plain-dict description recorded in run metadata."""
        return {"method": self.name}
