"""The notebooks are stored clean and follow the house rules (nbval executes them separately).

Clean means: no outputs and no execution counts, except the outputs of cells marked
``# NBVAL_CHECK_OUTPUT`` (nbval compares those), which must be plain text and error-free.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import nbformat
import pytest

from workbench import nbtools, profiles
from workbench.batch import execute

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
EXPECTED = ["00_quickstart", "01_error_model", "02_ptq", "03_flatness", "04_preconditioning", "05_explorer",
            "06_study_member", "07_report", "08_does_it_work", "09_what_goes_wrong", "10_your_model"]
CHECK = "# NBVAL_CHECK_OUTPUT"
#: Lines of logic allowed in one code cell: longer logic belongs in workbench.nbtools or a module.
MAX_LOGIC_LINES = 8
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _read(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebook_set() -> None:
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_clean(path: Path) -> None:
    nb = _read(path)
    checked = 0
    for i, cell in enumerate(_code_cells(nb)):
        if CHECK in cell.source:
            checked += 1
            assert cell.outputs, f"{path.name} code cell {i}: checked cell without stored output (refresh it)"
            assert isinstance(cell.execution_count, int), f"{path.name} cell {i}: nbval skips cells never run"
            for out in cell.outputs:
                assert out.output_type in ("stream", "execute_result"), f"{path.name} cell {i}: {out.output_type}"
                if out.output_type == "stream":
                    assert out.name == "stdout", f"{path.name} cell {i}: stderr stored"
                else:
                    assert set(out.data) == {"text/plain"}, f"{path.name} cell {i}: rich output stored"
        else:
            assert not cell.outputs, f"{path.name} code cell {i} has stale outputs"
            assert cell.execution_count is None, f"{path.name} code cell {i} has an execution count"
        assert "papermill" not in cell.metadata, f"{path.name}: executed by papermill, not cleaned"
    assert checked >= 1, f"{path.name}: mark at least one deterministic cell with {CHECK}"
    assert "papermill" not in nb.metadata and "widgets" not in nb.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_kernel_is_plain_python3(path: Path) -> None:
    # nbval (--nbval-current-env) and the runner both map this name onto the running interpreter
    assert _read(path).metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_structure(path: Path) -> None:
    nb = _read(path)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.stem[:2]} ")
    assert "**What you will learn.**" in first.source and "**Time.**" in first.source
    assert last.cell_type == "markdown" and last.source.startswith("## Try this")
    assert len(re.findall(r"`\w+ ?=", last.source)) + last.source.count("`results_dir") >= 2, \
        "Try-this prompts name the parameter to change"
    code = _code_cells(nb)
    assert code[0].metadata.get("tags") == ["parameters"], "the first code cell is the parameters cell"
    assert "import workbench as wb" in code[1].source
    assert re.search(r"nbt\.start\(\"" + path.stem + r"\"", code[2].source), "record the run first"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_keep_logic_in_the_package(path: Path) -> None:
    for i, cell in enumerate(_code_cells(_read(path))[1:], 1):
        tree = ast.parse(cell.source)  # also: every cell is valid Python
        stmts = [n for n in ast.walk(tree) if isinstance(n, ast.stmt) and not isinstance(n, (ast.Import, ast.ImportFrom))]
        assert len(stmts) <= MAX_LOGIC_LINES, f"{path.name} code cell {i}: {len(stmts)} statements; move logic to nbtools"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nb = _read(path)
    src = _code_cells(nb)[0].source
    assigned = [ln.split("=")[0].strip() for ln in src.splitlines() if ln and not ln.startswith("#")]
    with caplog.at_level(logging.WARNING, logger="papermill"):
        declared = execute.notebook_parameters(path)
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()], "papermill must parse every line"
    assert list(declared) == assigned
    assert declared["out_dir"] == "None", "defaults write to a new folder, never a fixed one"
    # the defaults are the quick profile
    for key, value in profiles.QUICK_PROFILE.items():
        if key in declared:
            assert ast.literal_eval(declared[key]) == value, f"{path.name}: {key} is not the quick-profile default"
    # every parameter is recorded in run.json, read from the namespace rather than retyped: run the
    # parameters and import cells as a kernel would (IPython's own names included) and compare
    start_cell = _code_cells(nb)[2].source
    assert "nbt.parameters(globals())" in start_cell, f"{path.name}: record the parameters with nbt.parameters(globals())"
    namespace: dict = {"In": ["x"], "Out": {1: "y"}, "_ih": [], "get_ipython": print}
    exec(src, namespace)
    exec(_code_cells(nb)[1].source, namespace)
    assert set(nbtools.parameters(namespace)) == set(declared), f"{path.name}: recorded parameters differ"


def test_profiles_only_name_declared_parameters() -> None:
    declared = set().union(*(execute.notebook_parameters(p) for p in NOTEBOOKS))
    for name in profiles.PROFILES:
        assert set(execute.profile_params(name)) <= declared, name


def test_pytest_collects_notebooks_with_nbval() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in cfg["testpaths"]
    assert "--nbval-lax" in cfg["addopts"] and "--nbval-current-env" in cfg["addopts"]


COURSE = sorted((NB_DIR / "course").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS + COURSE, ids=lambda p: p.stem)
def test_questions_and_a_self_check(path: Path) -> None:
    """Each notebook asks 2 or 3 questions whose answers unfold, and checks itself at least once
    with an assert that explains what went wrong (a message, not a bare assert)."""
    nb = _read(path)
    questions = sum(c.source.count("<details><summary>") for c in nb.cells if c.cell_type == "markdown")
    assert 2 <= questions <= 3, f"{path.name}: {questions} questions"
    explained = [n for c in _code_cells(nb) for n in ast.walk(ast.parse(c.source))
                 if isinstance(n, ast.Assert) and n.msg is not None]
    assert explained, f"{path.name}: no self-check (an assert with a message saying what went wrong)"
