"""Several processes: the process group from torchrun's environment, rank helpers, reductions.

``torchrun --nproc-per-node N -m workbench.cli train ...`` starts N copies of the same command
with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`init_from_env` turns that environment into a process group (``nccl`` when training on
CUDA, ``gloo`` on CPU) and does nothing in a single process, so the same code runs both ways.
Everything else here is a no-op (or the identity) without a process group of two or more ranks.

Conventions the rest of the workbench follows (see docs/scaling.md):

* ``TrainConfig.batch_size`` is the **global** batch: each rank takes a contiguous slice of
  ``batch_size / world_size`` images of the same global, seeded permutation
  (:func:`shard_bounds`), so N processes see exactly the batches one process would.
* BatchNorm layers use the statistics of the global batch while training under DDP
  (:func:`sync_batchnorm`, CPU and CUDA alike), so a 2 x 64 run equals a 1 x 128 run.
* Rank 0 (:func:`is_main`) alone writes files, logs progress and shows progress bars.
"""

from __future__ import annotations

import datetime
import logging
import os
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, WorkbenchError

log = logging.getLogger(__name__)

T = TypeVar("T")
#: The variables torchrun sets for every worker (``LOCAL_RANK`` defaults to ``RANK``).
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX", "mean": "SUM"}


# ---------------------------------------------------------------------------------------
# process group


def _env_int(name: str, default: int | None = None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun; "
                          "launch with `torchrun --nproc-per-node N ...`)") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    ws = _env_int("WORLD_SIZE", 1)
    if ws is None or ws < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {os.environ.get('WORLD_SIZE')!r}")
    return ws


def is_initialized() -> bool:
    """Whether a process group exists (``torch.distributed`` available and initialized)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` (torchrun), else the global rank."""
    local = _env_int("LOCAL_RANK")
    return get_rank() if local is None else local


def is_distributed() -> bool:
    """True when running as one of two or more processes of an initialized group."""
    return get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and logs."""
    return get_rank() == 0


def get_backend() -> str | None:
    """The process group's backend (``gloo``, ``nccl``), or None without a process group."""
    return str(dist.get_backend()) if is_initialized() else None


def backend_for(device: str | torch.device | None) -> str:
    """``nccl`` for CUDA devices (where available), ``gloo`` otherwise."""
    from .runinfo import resolve_device

    dev = resolve_device(device)
    return "nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo"


def init_from_env(device: str | torch.device | None = "auto", *, backend: str | None = None,
                  timeout: float | None = None) -> bool:
    """Initialize the default process group from torchrun's environment variables.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, and nothing more than checking
    the world size when a group already exists (returns True). On CUDA the process's GPU becomes
    ``cuda:LOCAL_RANK``.

    Args:
        device: the training device (``auto``, ``cpu``, ``cuda``); picks the backend.
        backend: override the backend (``gloo``, ``nccl``).
        timeout: seconds a collective (and the rendezvous) may wait (default: torch's).

    Returns:
        Whether this process is part of a group of two or more processes.

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 but a torchrun variable is missing or malformed, the
            local rank has no GPU, or the process group could not be initialized (the message
            names the backend, ``MASTER_ADDR:MASTER_PORT`` and the cause).
    """
    world = env_world_size()
    if is_initialized():
        if world > 1 and dist.get_world_size() != world:
            raise ConfigError(f"a process group of {dist.get_world_size()} processes exists but "
                              f"WORLD_SIZE={world}")
        return dist.get_world_size() > 1
    if world == 1:
        return False
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} is set but this PyTorch build has no torch.distributed")
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "not: launch with `torchrun --nproc-per-node N -m workbench.cli train ...` (which sets "
                          f"{', '.join(ENV_VARS)} and LOCAL_RANK), or unset WORLD_SIZE to train in one process")
    rank = _env_int("RANK", 0) or 0
    local = _env_int("LOCAL_RANK", rank) or 0
    if not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank} / LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    backend = backend or backend_for(device)
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s): start "
                              "at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "world_size": world, "rank": rank}
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout))
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, ValueError, OSError, TimeoutError) as e:  # DistNetworkError/DistStoreError are RuntimeErrors
        msg = str(e).strip().splitlines()[0][:300].rstrip(".") if str(e).strip() else type(e).__name__
        raise ConfigError(f"WORLD_SIZE={world} is set but the {backend} process group (rank {rank}, master {where}) "
                          f"could not be initialized: {msg}. Check MASTER_ADDR/MASTER_PORT (reachable from every "
                          "node, port free), or unset WORLD_SIZE to train in one process") from e
    log.log(logging.INFO if rank == 0 else logging.DEBUG, "process group: rank %d of %d (local rank %d), "
            "backend %s, master %s", rank, world, local, backend, where)
    return True


def cleanup() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    if is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """The device this rank computes on: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", get_local_rank() % max(1, torch.cuda.device_count()))
    return device


def _comm_device() -> torch.device:
    """Where tensors made up for a collective must live (NCCL only moves CUDA tensors)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# collectives (identity in one process)


def barrier() -> None:
    """Wait until every rank got here."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` across ranks in place (``sum``, ``mean``, ``min``, ``max``) and return it."""
    if op not in _OPS:
        raise ConfigError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if is_distributed():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
        if op == "mean":
            tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_values(values: Sequence[float], op: str = "sum") -> list[float]:
    """:func:`all_reduce_` for a few Python numbers (one collective, float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    return all_reduce_(t, op).tolist()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (pickled; for small things such as a path)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere); ``[obj]`` in one process.

    Pickled through the process group: for per-rank state of modest size (random generator
    states, a noise bank), not for model weights.
    """
    if not is_distributed():
        return [obj]
    box: list[Any] | None = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, box, dst=0)
    return box


def call_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    An error raised on rank 0 is raised on every rank, so no rank is left waiting in a later
    collective (e.g. rank 0 refuses to overwrite the output folder: every rank stops).
    """
    if not is_distributed():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn())
        except WorkbenchError as e:  # sent as (class, message): custom constructors need not unpickle
            outcome = (False, (type(e), str(e)))
        except Exception as e:
            broadcast_object((False, (RuntimeError, f"rank 0 failed: {type(e).__name__}: {e}")))
            raise
    ok, value = broadcast_object(outcome)
    if ok:
        return value
    cls, message = value
    try:
        err = cls(message)
    except TypeError:  # a constructor with required keywords
        err = WorkbenchError(message)
    raise err


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most 1)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} does not fit world_size {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


def check_global_batch(batch_size: int) -> int:
    """The per-rank batch of a global ``batch_size``; refuses one the processes cannot share evenly."""
    world = get_world_size()
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} is the global batch and must be divisible by the "
                          f"number of processes ({world})")
    return batch_size // world


def seed_offset() -> int:
    """Added to the training seed on each rank, so random streams (noise, dropout) are independent
    per rank and reproducible: ``seed + rank``."""
    return get_rank()


# ---------------------------------------------------------------------------------------
# BatchNorm over the global batch


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _synced_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm forward whose training statistics are those of the union of all ranks' batches.

    One differentiable all-reduce of ``[sum(x - c), sum((x - c)^2), count]`` per call (its backward
    is the all-reduce of the gradients): the shift ``c`` (the running mean, equal on every rank)
    keeps the one-pass variance accurate. Running statistics are updated exactly as
    ``F.batch_norm`` does, with the unbiased variance of the global batch.
    """
    cls_forward = type(self).forward
    if not (self.training and is_distributed()):
        return cls_forward(self, x)
    self._check_input_dim(x)
    c = self.num_features
    view = (1, c) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32 at least
    if self.running_mean is not None:
        shift = self.running_mean.detach().to(xf.dtype).clone()
    else:
        shift = torch.zeros(c, device=x.device, dtype=xf.dtype)
    xs = xf - shift.view(view)
    local_n = x.numel() // c
    count = torch.full((1,), float(local_n), device=x.device, dtype=xf.dtype)
    stats = _AllReduceSum.apply(torch.cat([xs.sum(dims), (xs * xs).sum(dims), count]))
    n = stats[-1].detach()
    if local_n < 2 and float(n) <= 1:  # the host sync only where the local batch cannot vouch for it
        raise ValueError(f"Expected more than 1 value per channel when training (global batch), got {int(n)}")
    mean_s = stats[:c] / n
    var = (stats[c:2 * c] / n - mean_s * mean_s).clamp_min(0)          # biased, as BN normalizes with
    mean = shift + mean_s
    y = (xf - mean.view(view)) * torch.rsqrt(var + self.eps).view(view)
    if self.affine:
        y = y * self.weight.to(xf.dtype).view(view) + self.bias.to(xf.dtype).view(view)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), f)
            unbiased = var.detach() * (n / (n - 1))
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), f)
    return y.to(x.dtype)


@contextmanager
def sync_batchnorm(model: nn.Module) -> Iterator[int]:
    """While inside, BatchNorm layers of ``model`` normalize with global-batch statistics in training.

    Works on CPU (gloo), where ``torch.nn.SyncBatchNorm`` refuses, and on CUDA. The modules are not
    replaced (only their ``forward`` is overridden on the instance, and restored on exit), so
    ``state_dict`` keys, checkpoints and the caller's model stay as they are. ``SyncBatchNorm``
    layers (already synchronized) are left alone. A no-op without a process group.

    Yields:
        The number of BatchNorm layers synchronized.
    """
    patched: list[nn.Module] = []
    if is_distributed():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm) \
                    and "forward" not in m.__dict__:
                m.forward = types.MethodType(_synced_bn_forward, m)
                patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
