"""Seed statistics: means with Student-t intervals, and paired differences against a control arm.

A pre-conditioned model is compared with the *plain fine-tune of the same parent, seed and
steps* (the control). Pairing by seed removes what the seed does to both (data order, dropout,
calibration draw), so the spread of the differences is what decides whether an effect is real:
an interval that contains 0 means "not distinguishable at this number of seeds".

The interval is ``mean ± t(1 - α/2, n - 1) · s / √n`` with ``s`` the sample standard deviation
(``n - 1`` in the denominator). With one seed there is no spread: std and interval are NaN and
the row says ``n = 1``.

With few pairs the t interval leans on the differences being roughly normal; the percentile
bootstrap (:func:`bootstrap_interval`) does not, but it is too narrow below about 10 values
(it cannot see beyond the values it resamples). Reports give the t interval and say how many
pairs it stands on; ``interval="bootstrap"`` is there for larger studies.

Rank correlations (:func:`spearman`, :func:`spearman_interval`) are refused below
:data:`MIN_RANK_POINTS` points: over 2 points Spearman's rho is +-1 whatever the data are.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from .errors import ConfigError

#: Fewest points a rank correlation is computed over: with 2 points Spearman's rho is +-1 by
#: construction, with 3 or 4 it takes a handful of values that chance reaches easily.
MIN_RANK_POINTS = 5


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy's, which
    scikit-learn already brings)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """``n``, ``mean``, ``std`` (sample), ``ci_low``, ``ci_high``, ``half_width`` of ``values``.

    Raises:
        ConfigError: no values, or a confidence outside (0, 1).
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ConfigError("no values to summarize")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": math.nan, "half_width": math.nan, "ci_low": math.nan,
                "ci_high": math.nan}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "ci_low": mean - half, "ci_high": mean + half}


def bootstrap_interval(values: Iterable[float], confidence: float = 0.95, *, n_boot: int = 10_000,
                       seed: int = 0) -> dict[str, float]:
    """The mean of ``values`` with a percentile-bootstrap interval (``n_boot`` resamples drawn
    with a generator seeded by ``seed``, so the interval is reproducible); same keys as
    :func:`mean_interval`, ``std`` being the sample standard deviation.

    Raises:
        ConfigError: no values, a confidence outside (0, 1), or ``n_boot`` < 100.
    """
    import numpy as np

    xs = np.asarray([float(v) for v in values], dtype=np.float64)
    if xs.size == 0:
        raise ConfigError("no values to summarize")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 100:
        raise ConfigError(f"n_boot must be >= 100 for a percentile interval, got {n_boot}")
    mean = float(xs.mean())
    if xs.size < 2:
        return {"n": 1, "mean": mean, "std": math.nan, "half_width": math.nan, "ci_low": math.nan,
                "ci_high": math.nan}
    rng = np.random.default_rng(seed)
    means = xs[rng.integers(0, xs.size, size=(n_boot, xs.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"n": int(xs.size), "mean": mean, "std": float(xs.std(ddof=1)), "half_width": float(hi - lo) / 2,
            "ci_low": float(lo), "ci_high": float(hi)}


INTERVALS = {"t": mean_interval, "bootstrap": bootstrap_interval}


def paired_summary(rows: Sequence[Mapping[str, Any]], *, value: str = "accuracy", arm: str = "arm",
                   pair: str = "seed", by: Sequence[str] = ("config", "observer"), control: str = "plain",
                   confidence: float = 0.95, interval: str = "t") -> list[dict[str, Any]]:
    """Per ``by`` group and arm: the mean of ``value`` over the pairs (seeds) with its interval,
    and the paired difference ``arm - control`` (same ``pair`` key) with its interval.

    Returns:
        Rows with the ``by`` keys, ``arm``, ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``
        and, for arms other than the control that share pairs with it, ``n_pairs``,
        ``diff_mean``, ``diff_std``, ``diff_ci_low``, ``diff_ci_high`` and ``verdict``
        (``better``, ``worse`` or ``not distinguishable``; ``one pair`` when there is no spread
        to judge by). ``interval`` is ``t`` (Student) or ``bootstrap`` (percentile).

    Raises:
        ConfigError: a row lacks one of the keys, two rows share arm, pair and group, or the
            interval is unknown.
    """
    if interval not in INTERVALS:
        raise ConfigError(f"unknown interval {interval!r}: use one of {sorted(INTERVALS)}")
    summarize = INTERVALS[interval]
    groups: dict[tuple[Hashable, ...], dict[str, dict[Hashable, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        try:
            key = tuple(r[k] for k in by)
            a, p, v = r[arm], r[pair], float(r[value])
        except KeyError as e:
            raise ConfigError(f"row {dict(r)} has no {e.args[0]!r}: paired_summary needs "
                              f"{[*by, arm, pair, value]}") from None
        if p in groups[key][a]:
            raise ConfigError(f"two rows for {arm}={a!r}, {pair}={p!r} in group {dict(zip(by, key))}")
        groups[key][a][p] = v
    out = []
    for key, arms in groups.items():
        base = arms.get(control, {})
        for a, by_pair in arms.items():
            row: dict[str, Any] = {**dict(zip(by, key)), "arm": a,
                                   **{k: v for k, v in summarize(by_pair.values(), confidence).items()
                                      if k != "half_width"}}
            shared = sorted(p for p in by_pair if p in base)
            if a != control and shared:
                d = summarize([by_pair[p] - base[p] for p in shared], confidence)
                row.update(n_pairs=d["n"], diff_mean=d["mean"], diff_std=d["std"], diff_ci_low=d["ci_low"],
                           diff_ci_high=d["ci_high"], verdict=_verdict(d))
            out.append(row)
    return out


def _verdict(d: Mapping[str, float]) -> str:
    if d["n"] < 2:
        return "one pair"
    if d["ci_low"] > 0:
        return "better"
    if d["ci_high"] < 0:
        return "worse"
    return "not distinguishable"


# ----------------------------------------------------------------------------- rank correlation


def _ranks(x: Sequence[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for t in range(i, j + 1):  # ties share the average rank
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if fewer than 2 points or a constant input."""
    if len(x) != len(y):
        raise ConfigError(f"x and y differ in length: {len(x)} vs {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 2:
        return math.nan
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


def spearman_interval(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Spearman's rho with a confidence interval from Fisher's z, ``atanh(rho)``, whose standard
    error for a rank correlation is ``sqrt(1.06 / (n - 3))`` (Fieller, Hartley and Pearson, 1957).

    Returns ``n``, ``rho``, ``ci_low``, ``ci_high``; with fewer than :data:`MIN_RANK_POINTS`
    points (after dropping NaN) ``rho`` and the interval are NaN and ``note`` says why: a rank
    correlation over 2 points is +-1 by construction.
    """
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if not (math.isnan(float(a)) or math.isnan(float(b)))]
    if len(x) != len(y):
        raise ConfigError(f"x and y differ in length: {len(x)} vs {len(y)}")
    n = len(pairs)
    if n < MIN_RANK_POINTS:
        return {"n": n, "rho": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                "note": f"{n} point(s): no rank correlation below {MIN_RANK_POINTS}"}
    rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
    if math.isnan(rho):
        return {"n": n, "rho": rho, "ci_low": math.nan, "ci_high": math.nan, "note": "a constant input"}
    from scipy.stats import norm

    z = math.atanh(max(min(rho, 1 - 1e-12), -1 + 1e-12))
    half = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(1.06 / (n - 3))
    return {"n": n, "rho": rho, "ci_low": math.tanh(z - half), "ci_high": math.tanh(z + half), "note": ""}
