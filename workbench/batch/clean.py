"""Keeping the stored notebooks clean: outputs stripped except the cells nbval checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: Cells whose stored output nbval compares (``--nbval-lax``); every other output is stripped.
CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"


def clean_notebook(path: str | Path, executed: str | Path | None = None) -> int:
    """Strip outputs, execution counts and run metadata from a stored notebook, keeping (or, from
    ``executed``, refreshing) the outputs of cells marked ``# NBVAL_CHECK_OUTPUT``.

    Maintainers run it after editing a notebook, with the notebook executed at its defaults
    (e.g. ``DIR/executed/NB.ipynb`` of a quick ``workbench run``). Returns the checked cells kept.

    Raises:
        ConfigError: a checked cell has no output to keep, or its output is an error.
    """
    import nbformat

    from ..runinfo import atomic_write_text

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    fresh: dict[str, Any] = {}
    if executed is not None:
        ex = nbformat.read(Path(executed), as_version=4)
        fresh = {c.source: c.outputs for c in ex.cells if c.cell_type == "code" and CHECK_MARKER in c.source}
    kept = n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        n += 1
        cell.execution_count = None
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if CHECK_MARKER in cell.source:
            outputs = fresh.get(cell.source, cell.outputs)
            if not outputs or any(o.output_type == "error" for o in outputs):
                raise ConfigError(f"{path.name}: checked cell has no usable output:\n{cell.source[:200]}")
            cell.execution_count = n  # nbval fails a cell with outputs but no count as 'unrun'
            for o in outputs:
                if o.output_type == "execute_result":  # nbval compares the text only
                    o.execution_count = n
                    o.data = {k: v for k, v in o.data.items() if k == "text/plain"}
                    o.metadata = {}
            cell.outputs = outputs
            kept += 1
        else:
            cell.outputs = []
    for key in ("papermill", "widgets"):
        nb.metadata.pop(key, None)
    atomic_write_text(path, nbformat.writes(nb) + "\n")
    return kept
