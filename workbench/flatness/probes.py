"""Random probe vectors and the statistics of their samples (mean and standard error)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def rademacher(n: int, generator: torch.Generator | None, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # drawn on the generator's device (CPU by default) so results do not depend on the compute device
    gdev = generator.device if generator is not None else torch.device("cpu")
    return (torch.randint(0, 2, (n,), generator=generator, device=gdev).to(dtype) * 2 - 1).to(device)


def randn(n: int, generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(n, generator=generator, device=gdev, dtype=dtype).to(device)


def mean_se(x: Sequence[float]) -> tuple[float, float]:
    n = len(x)
    mean = sum(x) / n
    if n < 2:
        return mean, math.inf
    var = sum((v - mean) ** 2 for v in x) / (n - 1)
    return mean, math.sqrt(var / n)


