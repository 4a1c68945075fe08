"""Exercise notebooks made from their solutions, so the two can never drift apart.

A solution notebook marks the reader's part of a code cell with two comment lines::

    def weight_sigma(w, bits, k):
        # BEGIN SOLUTION
        qmax = 2 ** (bits - 1) - 1
        ...
        # END SOLUTION

:func:`strip_solutions` replaces every marked block by ``<indent>return None  # TODO: ...`` (the
text after ``BEGIN SOLUTION`` becomes the hint) and drops all outputs. The checks that follow in
the notebook then fail until the reader writes the code, which is the point of an exercise.
``tests/test_course.py`` runs the solution and checks that the exercise, as shipped, fails.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION(?P<hint>.*)$")


def strip_source(source: str) -> str:
    """One cell's source with every solution block replaced by a ``return None  # TODO`` line."""
    out: list[str] = []
    inside = False
    for line in source.splitlines():
        m = _BEGIN_RE.match(line)
        if m and not inside:
            hint = m.group("hint").strip(" :") or "your code here"
            out.append(f"{m.group('indent')}return None  # TODO: {hint}")
            inside = True
        elif line.strip() == END:
            if not inside:
                raise ConfigError(f"'{END}' without '{BEGIN}' in:\n{source}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ConfigError(f"'{BEGIN}' without '{END}' in:\n{source}")
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def strip_solutions(nb: dict[str, Any]) -> dict[str, Any]:
    """An exercise notebook (a new dict) from a solution notebook's JSON dict."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cell["source"] = strip_source(src).splitlines(True)
        cell["outputs"], cell["execution_count"] = [], None
    return nb


def write_exercise(solution: str | Path, exercise: str | Path) -> Path:
    """Write the exercise version of the ``solution`` notebook file to ``exercise``."""
    from .runinfo import atomic_write_text

    nb = json.loads(Path(solution).read_text())
    atomic_write_text(exercise, json.dumps(strip_solutions(nb), indent=1, ensure_ascii=False) + "\n")
    return Path(exercise)
