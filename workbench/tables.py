"""The one table printer: tidy rows as fixed-width text (terminal), HTML (JupyterLab) or Markdown
(reports), with one number format (:func:`fmt`). No pandas."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

#: What a missing value (``None`` or NaN) prints as, in every format.
MISSING = "-"

#: A column: a row key, or (row key, heading).
Column = str | tuple[str, str]


def fmt(v: Any, digits: int = 2, *, sign: bool = False, fixed: bool = False) -> str:
    """One cell: floats with ``digits`` decimals, or ``digits`` significant figures when that
    would print 0 or a long number (below 10^-digits or from 10^6 on), unless ``fixed`` (reports,
    whose columns of intervals read best aligned); ``sign`` writes ``+`` on positive numbers
    (differences); ``None`` and NaN as :data:`MISSING`; lists joined by commas."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits, sign=sign, fixed=fixed) for x in v)
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # a NumPy or torch scalar
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return MISSING
        plus = "+" if sign else ""
        if fixed or v == 0 or 10 ** -digits <= abs(v) < 1e6:
            return f"{v:{plus}.{digits}f}"
        return f"{v:{plus}.{digits}g}"
    if isinstance(v, int) and sign:
        return f"{v:+d}"
    return str(v)


class Table:
    """Tidy rows shown as an HTML table in JupyterLab and as fixed-width text elsewhere;
    :meth:`markdown` for reports.

    Args:
        rows: dicts; a missing key is a missing value.
        columns: row keys, or (key, heading) pairs (default: every key, in order of appearance).
        digits: decimals of :func:`fmt`.
        title: printed above the text table, the HTML caption.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None, digits: int = 2,
                 title: str | None = None) -> None:
        self.rows = [dict(r) for r in rows]
        cols: list[Column] = list(columns or [])
        if not cols:
            keys: list[str] = []
            for r in self.rows:
                keys += [k for k in r if k not in keys]
            cols = list(keys)
        self.keys = [c if isinstance(c, str) else c[0] for c in cols]
        self.columns = [c if isinstance(c, str) else c[1] for c in cols]  # the headings
        self.digits, self.title = digits, title

    def cells(self) -> list[list[str]]:
        return [[fmt(r.get(k), self.digits) for k in self.keys] for r in self.rows]

    def text(self) -> str:
        if not self.rows:
            return "(no rows)"
        cells = self.cells()
        widths = [max(len(c), *(len(t[i]) for t in cells)) for i, c in enumerate(self.columns)]
        lines = ([self.title] if self.title else []) + ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in cells]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.cells())
        cap = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def markdown(self) -> str:
        """A GitHub Markdown table (``|`` inside a cell escaped)."""
        def row(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        return "\n".join([row(self.columns), "|" + "---|" * len(self.columns), *(row(c) for c in self.cells())])

    __repr__ = text

    def _repr_html_(self) -> str:
        return self.html()


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None, digits: int = 2) -> str:
    """Rows as fixed-width text (the terminal's table)."""
    return Table(rows, columns, digits).text()


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None, digits: int = 2) -> str:
    """Rows as a Markdown table (the reports' table)."""
    return Table(rows, columns, digits).markdown()
