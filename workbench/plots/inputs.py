"""What the figure builders accept: tidy rows, a pandas DataFrame, result objects; numbers for hover text."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError

Rows = list[dict[str, Any]]


def as_rows(table: Any, required: Sequence[str] = (), what: str = "table") -> Rows:
    """Rows (a list of dicts) from rows, a ``TrainResult``, a result dataclass list or a pandas DataFrame.

    Raises:
        ConfigError: the table is empty or a row lacks one of ``required`` (the message lists them).
    """
    if hasattr(table, "history") and isinstance(table.history, list):  # TrainResult
        table = table.history
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame, without importing pandas
        table = table.to_dict("records")
    if isinstance(table, Mapping) or not isinstance(table, Iterable) or isinstance(table, (str, bytes)):
        raise ConfigError(f"{what} must be a list of dict rows (or a pandas DataFrame), got {type(table).__name__}"
                          f"; expected columns: {', '.join(required)}")
    rows: Rows = []
    for r in table:
        if dataclasses.is_dataclass(r) and not isinstance(r, type):
            r = r.to_dict() if hasattr(r, "to_dict") else dataclasses.asdict(r)
        if not isinstance(r, Mapping):
            raise ConfigError(f"{what} rows must be dicts, got {type(r).__name__}")
        rows.append(dict(r))
    if not rows:
        raise ConfigError(f"{what} is empty: expected rows with columns {', '.join(required)}")
    missing = sorted({c for r in rows for c in required if c not in r})
    if missing:
        raise ConfigError(f"{what} lacks column(s) {missing}; expected columns: {', '.join(required)} "
                          f"(found: {', '.join(rows[0])})")
    return rows


def num(v: Any) -> float | None:
    """A plottable number: None and NaN become None (a gap), everything else a float."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def as_list(x: Any) -> list[float]:
    """Floats from a tensor, an array or a sequence (no torch/numpy import needed here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "flatten"):
        x = x.flatten()
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [float(v) for v in x]


def hover_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
