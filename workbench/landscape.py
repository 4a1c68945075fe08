"""Loss landscapes: 1D along a random filter-normalized direction, 1D on the line between two models,
2D on a random filter-normalized plane (Li et al., "Visualizing the loss landscape of neural nets").

All evaluations go through ``torch.func.functional_call`` on ``params + alpha * direction``: the model
is never modified (parameters and buffers stay bitwise equal, train/eval flags are restored) and
losses are those of eval mode (dropout off, BatchNorm running statistics).

Filter normalization, written down once:

* A parameter with 2 or more dimensions (Linear/Conv weights, embeddings) is split into filters along
  dimension 0 (output channels); each random filter ``d_f`` is rescaled to ``||w_f||``. A filter whose
  weights are all zero gets a zero direction (no division by zero on fresh or pruned models).
* 1-D parameters (biases, norm scales/shifts) are handled explicitly by ``one_d``:
  ``"ignore"`` (default, as Li et al.): zero direction; ``"normalize"``: the whole vector is rescaled to
  ``||w||``, and an all-zero vector (fresh biases) gets a zero direction; ``"random"``: the raw unit-variance
  Gaussian (useful to probe zero-initialized parameters on purpose).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import ConfigError, ModelError
from .flatness import Batch, as_batches, model_device, preserved_mode, select_params
from .runinfo import progress_bar

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ONE_D = ("ignore", "normalize", "random")
#: A filter (or 1-D vector) with norm below this counts as all-zero.
ZERO_NORM = 1e-12


@dataclass(frozen=True)
class Landscape1D:
    """Loss (and top-1 accuracy, percent) at ``origin + alpha * direction`` for each alpha."""

    kind: str  # "random" | "line"
    alphas: tuple[float, ...]
    losses: tuple[float, ...]
    accuracies: tuple[float, ...]

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows: one dict per grid point."""
        return [{"kind": self.kind, "alpha": a, "loss": lo, "accuracy": ac}
                for a, lo, ac in zip(self.alphas, self.losses, self.accuracies)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Landscape2D:
    """Loss (and top-1 accuracy, percent) at ``origin + alpha * d1 + beta * d2``; ``losses[i][j]`` is at ``(alphas[i], betas[j])``."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    losses: tuple[tuple[float, ...], ...]
    accuracies: tuple[tuple[float, ...], ...]

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows: one dict per grid point."""
        return [{"alpha": a, "beta": b, "loss": self.losses[i][j], "accuracy": self.accuracies[i][j]}
                for i, a in enumerate(self.alphas) for j, b in enumerate(self.betas)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_direction(model: nn.Module, *, one_d: str = "ignore", params: str | Sequence[str] | None = None,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random filter-normalized direction ``{name: tensor}`` (CPU, the parameters' dtype).

    Args:
        one_d: how 1-D parameters are treated: ``ignore`` | ``normalize`` | ``random`` (module docstring).
        params: restrict to these parameter names/patterns (others get no direction).
        generator: for reproducible directions.
    """
    if one_d not in ONE_D:
        raise ConfigError(f"one_d must be one of {ONE_D}, got {one_d!r}")
    names = select_params(model, params)
    named = dict(model.named_parameters())
    out = {}
    for n in names:
        w = named[n].detach().cpu()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        if w.dim() >= 2:
            wn = w.flatten(1).norm(dim=1)  # (filters,)
            dn = d.flatten(1).norm(dim=1).clamp_min(ZERO_NORM)
            scale = torch.where(wn > ZERO_NORM, wn / dn, torch.zeros_like(wn))
            d = d * scale.view(-1, *([1] * (w.dim() - 1)))
        elif one_d == "ignore":
            d = torch.zeros_like(w)
        elif one_d == "normalize":
            wn = float(w.norm())
            d = d * (wn / max(float(d.norm()), ZERO_NORM)) if wn > ZERO_NORM else torch.zeros_like(w)
        out[n] = d
    return out


def _state_of(other: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(other, nn.Module):
        return {k: v.detach() for k, v in other.state_dict().items()}
    if isinstance(other, Mapping):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in other.items()}
    raise ConfigError(f"expected an nn.Module or a state_dict, got {type(other).__name__}")


class _Evaluator:
    """Loss and top-1 accuracy (percent) of the model at given parameters/buffers, functionally, on fixed batches."""

    def __init__(self, model: nn.Module, data: Batch | Iterable[Batch], loss_fn: LossFn | None,
                 device: str | torch.device | None) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else model_device(model)
        self.batches = [(x.to(self.device), y.to(self.device)) for x, y in as_batches(data)]
        self.n = sum(x.shape[0] for x, _ in self.batches)
        self.loss_fn = loss_fn or F.cross_entropy
        self.params = {k: v.detach().to(self.device) for k, v in model.named_parameters()}
        self.buffers = {k: v.detach().to(self.device) for k, v in model.named_buffers()}

    @torch.no_grad()
    def __call__(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor] | None = None
                 ) -> tuple[float, float]:
        state = {**self.params, **self.buffers, **params, **(buffers or {})}
        loss = correct = 0.0
        for x, y in self.batches:
            out = functional_call(self.model, (state,), (x,))
            loss += float(self.loss_fn(out, y)) * x.shape[0] / self.n
            correct += float((out.argmax(-1) == y).sum())
        return loss, 100.0 * correct / self.n


def _grid(span: tuple[float, float], steps: int) -> list[float]:
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    lo, hi = float(span[0]), float(span[1])
    if not lo <= hi:
        raise ConfigError(f"span must be (low, high) with low <= high, got {span}")
    return torch.linspace(lo, hi, steps, dtype=torch.float64).tolist() if steps > 1 else [lo]


def _check_direction(model: nn.Module, d: Mapping[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    bad = [k for k, v in d.items() if k not in named or tuple(v.shape) != tuple(named[k].shape)]
    if bad:
        raise ModelError(f"direction does not match the model's parameters: {bad[:5]}")


def landscape_1d(model: nn.Module, data: Batch | Iterable[Batch], *,
                 direction: Mapping[str, torch.Tensor] | None = None, span: tuple[float, float] = (-1.0, 1.0),
                 steps: int = 21, one_d: str = "ignore", params: str | Sequence[str] | None = None,
                 generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> Landscape1D:
    """Loss along ``w + alpha * d`` for a random filter-normalized ``d`` (or a given one).

    Args:
        span, steps: the alpha grid (``steps`` points from ``span[0]`` to ``span[1]``).
        direction: a ``{name: tensor}`` direction (e.g. from :func:`random_direction`); default random.
    """
    grid = _grid(span, steps)
    d = direction if direction is not None else random_direction(model, one_d=one_d, params=params,
                                                                 generator=generator)
    _check_direction(model, d)
    with preserved_mode(model, train=False):
        ev = _Evaluator(model, data, loss_fn, device)
        dd = {k: v.to(ev.device, ev.params[k].dtype) for k, v in d.items()}
        losses, accs = [], []
        bar = progress_bar(len(grid), "landscape 1d", progress)
        for a in grid:
            lo, ac = ev({k: ev.params[k] + a * v for k, v in dd.items()})
            losses.append(lo)
            accs.append(ac)
            bar.update(1)
        bar.close()
    return Landscape1D("random", tuple(grid), tuple(losses), tuple(accs))


def landscape_line(model: nn.Module, other: nn.Module | Mapping[str, torch.Tensor],
                   data: Batch | Iterable[Batch], *, span: tuple[float, float] = (-0.25, 1.25), steps: int = 21,
                   loss_fn: LossFn | None = None, device: str | torch.device | None = None,
                   progress: bool = True) -> Landscape1D:
    """Loss along ``(1 - alpha) * model + alpha * other`` (alpha 0: ``model``, alpha 1: ``other``).

    ``other`` is a model of the same architecture or its ``state_dict`` (e.g. plain vs pre-conditioned
    checkpoints). Floating-point buffers (BatchNorm statistics) are interpolated with alpha clamped to
    [0, 1], so extrapolated points use the nearest end's statistics (an extrapolated running variance
    could turn negative); integer buffers come from ``model``.

    Raises:
        ModelError: parameter names or shapes differ.
    """
    grid = _grid(span, steps)
    state_b = _state_of(other)
    named = dict(model.named_parameters())
    mismatch = [k for k, v in named.items() if k not in state_b or tuple(state_b[k].shape) != tuple(v.shape)]
    if mismatch:
        raise ModelError(f"the two models differ in parameters (names or shapes): {mismatch[:5]}")
    with preserved_mode(model, train=False):
        ev = _Evaluator(model, data, loss_fn, device)
        pb = {k: state_b[k].to(ev.device, v.dtype) for k, v in ev.params.items()}
        bb = {k: state_b[k].to(ev.device, v.dtype) for k, v in ev.buffers.items()
              if v.is_floating_point() and k in state_b}
        losses, accs = [], []
        bar = progress_bar(len(grid), "landscape line", progress)
        for a in grid:
            p = {k: torch.lerp(v, pb[k], a) for k, v in ev.params.items()}
            ac = min(max(a, 0.0), 1.0)
            b = {k: torch.lerp(ev.buffers[k], v, ac) for k, v in bb.items()}
            lo, acc = ev(p, b)
            losses.append(lo)
            accs.append(acc)
            bar.update(1)
        bar.close()
    return Landscape1D("line", tuple(grid), tuple(losses), tuple(accs))


def landscape_2d(model: nn.Module, data: Batch | Iterable[Batch], *,
                 directions: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
                 span: tuple[float, float] = (-1.0, 1.0), steps: int | tuple[int, int] = 11,
                 one_d: str = "ignore", params: str | Sequence[str] | None = None,
                 generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> Landscape2D:
    """Loss on the plane ``w + alpha * d1 + beta * d2`` of two random filter-normalized directions.

    Args:
        steps: points per axis (one int for both, or ``(n_alpha, n_beta)``); the cost is their product.
    """
    na, nb = (steps, steps) if isinstance(steps, int) else steps
    ga, gb = _grid(span, na), _grid(span, nb)
    if directions is None:
        directions = (random_direction(model, one_d=one_d, params=params, generator=generator),
                      random_direction(model, one_d=one_d, params=params, generator=generator))
    for d in directions:
        _check_direction(model, d)
    with preserved_mode(model, train=False):
        ev = _Evaluator(model, data, loss_fn, device)
        d1, d2 = ({k: v.to(ev.device, ev.params[k].dtype) for k, v in d.items()} for d in directions)
        keys = set(d1) | set(d2)
        losses, accs = [], []
        bar = progress_bar(len(ga) * len(gb), "landscape 2d", progress)
        for a in ga:
            row_l, row_a = [], []
            for b in gb:
                p = {}
                for k in keys:
                    v = ev.params[k]
                    if k in d1:
                        v = v + a * d1[k]
                    if k in d2:
                        v = v + b * d2[k]
                    p[k] = v
                lo, ac = ev(p)
                row_l.append(lo)
                row_a.append(ac)
                bar.update(1)
            losses.append(tuple(row_l))
            accs.append(tuple(row_a))
        bar.close()
    return Landscape2D(tuple(ga), tuple(gb), tuple(losses), tuple(accs))
