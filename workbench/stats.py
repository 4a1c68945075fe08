"""Seed statistics: means with Student-t intervals, and paired differences against a control arm.

A pre-conditioned model is compared with the *plain fine-tune of the same parent, seed and
steps* (the control). Pairing by seed removes what the seed does to both (data order, dropout,
calibration draw), so the spread of the differences is what decides whether an effect is real:
an interval that contains 0 means "not distinguishable at this number of seeds".

The interval is ``mean ± t(1 - α/2, n - 1) · s / √n`` with ``s`` the sample standard deviation
(``n - 1`` in the denominator). With one seed there is no spread: std and interval are NaN and
the row says ``n = 1``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from .errors import ConfigError


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


def paired_summary(rows: Sequence[Mapping[str, Any]], *, value: str = "accuracy", arm: str = "arm",
                   pair: str = "seed", by: Sequence[str] = ("config", "observer"), control: str = "plain",
                   confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per ``by`` group and arm: the mean of ``value`` over the pairs (seeds) with its interval,
    and the paired difference ``arm - control`` (same ``pair`` key) with its interval.

    Returns:
        Rows with the ``by`` keys, ``arm``, ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``
        and, for arms other than the control that share pairs with it, ``n_pairs``,
        ``diff_mean``, ``diff_ci_low``, ``diff_ci_high`` and ``verdict`` (``better``, ``worse``
        or ``not distinguishable``; ``one pair`` when there is no spread to judge by).

    Raises:
        ConfigError: a row lacks one of the keys, or two rows share arm, pair and group.
    """
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
                                   **{k: v for k, v in mean_interval(by_pair.values(), confidence).items()
                                      if k != "half_width"}}
            shared = [p for p in by_pair if p in base]
            if a != control and shared:
                d = mean_interval([by_pair[p] - base[p] for p in shared], confidence)
                row.update(n_pairs=d["n"], diff_mean=d["mean"], diff_ci_low=d["ci_low"], diff_ci_high=d["ci_high"],
                           verdict=_verdict(d))
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
