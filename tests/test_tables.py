"""workbench.tables: the one table printer and number format, checked against hand-written output."""

from __future__ import annotations

import math

import numpy as np

from workbench.tables import MISSING, Table, fmt, format_table, markdown_table


def test_fmt_decimals_significant_figures_signs_and_missing() -> None:
    assert fmt(84.256) == "84.26" and fmt(84.256, 1) == "84.3" and fmt(0.0) == "0.00"
    assert fmt(0.004) == "0.004" and fmt(0.004, 3) == "0.004" and fmt(2.5e6) == "2.5e+06"
    assert fmt(1.5, sign=True) == "+1.50" and fmt(-1.5, sign=True) == "-1.50" and fmt(3, sign=True) == "+3"
    assert fmt(0.0083, sign=True) == "+0.0083" and fmt(0.0083, sign=True, fixed=True) == "+0.01"
    assert fmt(0.0032, fixed=True) == "0.00" and fmt(2.5e6, 1, fixed=True) == "2500000.0"
    assert fmt(None) == MISSING and fmt(math.nan) == MISSING and fmt(float("nan"), 4) == MISSING
    assert fmt(True) == "True" and fmt(7) == "7" and fmt("W4A4") == "W4A4" and fmt([1.0, None]) == "1.00, -"
    assert fmt(np.float32(0.25)) == "0.25" and fmt(np.int64(5)) == "5"


def test_text_html_and_markdown_show_the_same_cells() -> None:
    rows = [{"arm": "plain", "acc": 84.25, "drop": None}, {"arm": "dnq|k=1", "acc": 84.0, "extra": 1}]
    t = Table(rows, ["arm", ("acc", "accuracy"), "drop"], title="W4A4")
    assert t.text() == ("W4A4\n"
                        "arm      accuracy  drop\n"
                        "plain    84.25     -\n"
                        "dnq|k=1  84.00     -")
    assert repr(t) == t.text() and format_table(rows, ["arm", ("acc", "accuracy"), "drop"]) == t.text()[5:]
    assert markdown_table(rows, ["arm", ("acc", "accuracy"), "drop"]) == (
        "| arm | accuracy | drop |\n|---|---|---|\n| plain | 84.25 | - |\n| dnq\\|k=1 | 84.00 | - |")
    assert t._repr_html_().startswith("<table><caption>W4A4</caption><thead><tr><th>arm</th><th>accuracy</th>")
    assert "<td>dnq|k=1</td><td>84.00</td><td>-</td>" in t.html()
    # without columns: every key in order of first appearance
    assert Table(rows).columns == ["arm", "acc", "drop", "extra"] and Table([]).text() == "(no rows)"
