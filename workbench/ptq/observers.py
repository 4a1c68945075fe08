"""Observers: how a quantizer's clipping range is chosen from data.

One observer instance watches one activation tensor during calibration (``update``) and
then proposes a range (``activation_range``). The same classes also choose weight clipping
values (``weight_absmax``), where the data is the weight tensor itself.

* ``minmax``: the observed extremes. Never clips, so outliers inflate the step.
* ``percentile``: the ``p``-th percentile (and ``100-p``-th for the low end). Clips outliers.
* ``mse``: searches a grid of shrink factors of the min-max range for the one that minimizes
  the mean squared quantize-dequantize error. Factor 1 (= min-max) is on the grid, so its
  error is never worse than min-max's on the same data.

Percentile and MSE work on a random subsample of the calibration values, drawn evenly
from every batch; when a batch fits in its share, all of its values are kept (exact).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from .. import quant
from ..errors import ConfigError
from ..registry import Registry

logger = logging.getLogger(__name__)

#: Observer classes by name ("minmax", "percentile", "mse").
OBSERVERS: Registry[type[Observer]] = Registry("observer")

#: torch.quantile refuses inputs above this many elements.
_QUANTILE_LIMIT = 16_000_000


def _quantile(x: torch.Tensor, q: float, dim: int | None = None) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation, like numpy's default) that copes with big inputs."""
    x = x.float()
    if dim is None and x.numel() > _QUANTILE_LIMIT:
        x = x.flatten()[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:_QUANTILE_LIMIT]]
    return torch.quantile(x, q) if dim is None else torch.quantile(x, q, dim=dim)


class Observer:
    """Base class: tracks min/max, optionally a uniform subsample of the values.

    Args:
        percentile: upper percentile in (50, 100] used by ``percentile``.
        mse_grid: number of shrink factors the ``mse`` search tries.
        sample_size: about how many values percentile/MSE keep per observed tensor.
        n_calib: expected number of calibration images (spreads the sample over batches).
        seed: seed of the subsampling generator, for reproducible ranges.
    """

    name: ClassVar[str] = "base"
    needs_sample: ClassVar[bool] = False

    def __init__(self, *, percentile: float = 99.99, mse_grid: int = 50, sample_size: int = 2**18,
                 n_calib: int = 256, seed: int = 0) -> None:
        self.percentile = float(percentile)
        self.mse_grid = int(mse_grid)
        self.sample_size = int(sample_size)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.count = 0
        self._gen = torch.Generator().manual_seed(seed)
        self.n_calib = int(n_calib)
        self._chunks: list[torch.Tensor] = []  # kept values per batch (float32, CPU)
        self._values: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Record one batch of the observed tensor."""
        x = x.detach()
        lo, hi = x.min().float().cpu(), x.max().float().cpu()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += x.numel()
        if self.needs_sample:
            self._add_sample(x.flatten().float(), x.shape[0] if x.dim() > 1 else 1)

    def _add_sample(self, flat: torch.Tensor, images: int) -> None:
        # keep about sample_size * images / n_calib values of each batch, so the sample is spread
        # evenly over the calibration set; random indices (with replacement) cost one cheap kernel
        quota = max(1, -(-self.sample_size * images // self.n_calib))
        if flat.numel() > quota:
            flat = flat[torch.randint(flat.numel(), (quota,), generator=self._gen, device=flat.device)]
        self._chunks.append(flat.cpu())
        self._values = None

    @property
    def sample(self) -> torch.Tensor:
        """The kept values (all of them if they fit in ``sample_size``)."""
        if self._values is None:
            if not self._chunks:
                raise ConfigError(f"observer {self.name!r} has seen no data: calibrate first")
            self._values = torch.cat(self._chunks)
            self._chunks = [self._values]
        return self._values

    def _check_seen(self) -> None:
        if self.min is None:
            raise ConfigError(f"observer {self.name!r} has seen no data: calibrate first")

    def activation_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipping range ``(lo, hi)`` for a per-tensor activation quantizer."""
        self._check_seen()
        return self.min, self.max

    def weight_absmax(self, w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
        """Clipping value(s) for a symmetric weight quantizer (per output channel along dim 0)."""
        return quant.channel_absmax(w, 0) if per_channel else w.detach().abs().amax()


@OBSERVERS.register("minmax", help="observed min and max (no clipping)")
class MinMaxObserver(Observer):
    """Observed minimum and maximum: never clips."""

    name = "minmax"


@OBSERVERS.register("percentile", help="clip at the p-th / (100-p)-th percentile")
class PercentileObserver(Observer):
    """Clips at the ``percentile``-th (and ``100 - percentile``-th) percentile."""

    name = "percentile"
    needs_sample = True

    def activation_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample
        p = self.percentile / 100.0
        if symmetric:
            hi = _quantile(s.abs(), p)
            return -hi, hi
        return _quantile(s, 1.0 - p), _quantile(s, p)

    def weight_absmax(self, w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
        a = w.detach().abs().float()
        p = self.percentile / 100.0
        if per_channel:
            return _quantile(a.reshape(a.shape[0], -1), p, dim=1).reshape(quant.channel_shape(w, 0))
        return _quantile(a.flatten(), p)


@OBSERVERS.register("mse", help="clip that minimizes quantization MSE (grid search)")
class MSEObserver(Observer):
    """Searches shrink factors in ``(0, 1]`` of the min-max range for the smallest MSE."""

    name = "mse"
    needs_sample = True

    def _factors(self) -> torch.Tensor:
        # from 1.0 (= min-max) down to 0.2: tighter clips than that only help pathological data
        return torch.linspace(1.0, 0.2, max(self.mse_grid, 1))

    #: Values the activation search scores (a random subset of the sample): plenty for a mean.
    search_values: ClassVar[int] = 2**16
    #: Candidates scored per batched pass: few large ops instead of many small ones, which
    #: matters on busy machines where every small op pays a thread-synchronisation cost.
    chunk: ClassVar[int] = 10

    def activation_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample[: self.search_values]  # the sample is in random order already
        lo0, hi0 = self.min.clamp_max(0.0), self.max.clamp_min(0.0)
        factors = self._factors()
        # all candidate quantizers at once (vector QParams), scored in batched passes
        qp = quant.activation_qparams(lo0 * factors, hi0 * factors, bits, symmetric=symmetric)
        errs = []
        for i in range(0, len(factors), self.chunk):
            cand = quant.QParams(qp.step[i:i + self.chunk, None], qp.zero_point[i:i + self.chunk, None],
                                 qp.qmin, qp.qmax, qp.bits, qp.symmetric)
            errs.append((quant.fake_quantize(s[None, :], cand) - s).square_().sum(dim=1))  # (chunk,)
        best = int(torch.argmin(torch.cat(errs)))  # first minimum: ties keep the wider range
        return lo0 * factors[best], hi0 * factors[best]

    def weight_absmax(self, w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
        w = w.detach().float()
        base = super().weight_absmax(w, bits, per_channel)
        qmin, qmax = quant.qrange(bits, symmetric=True)
        flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        errs, cands = [], []
        for a in self._factors():
            qp = quant.weight_qparams(w, bits, per_channel, absmax=base * a)
            step = qp.step.reshape(-1)
            fq = quant.fake_quantize(flat, quant.QParams(step.reshape(-1, 1), torch.zeros(()), qmin, qmax, bits, True))
            errs.append((fq - flat).square().sum(dim=1))
            cands.append(step * qmax)
        best = torch.argmin(torch.stack(errs), dim=0)  # (channels,): first minimum per channel
        chosen = torch.stack(cands).gather(0, best[None]).reshape(-1)
        return chosen.reshape(base.shape) if per_channel else chosen.reshape(())


def make_observer(name: str, **kwargs: object) -> Observer:
    """Build a registered observer by name.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists valid names).
    """
    return OBSERVERS.get(name)(**kwargs)
