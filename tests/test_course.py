"""The course notebooks: each exercise is its solution with the reader's part taken out, the
solution runs (lighter parameters), and the exercise, as shipped, fails at its first check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.errors import ConfigError
from workbench.exercises import strip_solutions, strip_source

COURSE = Path(__file__).resolve().parents[1] / "notebooks" / "course"
SOLUTIONS = sorted(p for p in COURSE.glob("*.ipynb") if not p.name.endswith(".exercise.ipynb"))
#: A few steps and images: the solution's checks are what is tested, not its fine-tune.
LIGHT = {"steps": 3, "limit_test": 100, "n_calib": 32, "ptq_bits": [4]}


def test_strip_source_replaces_each_solution_block_by_a_todo_return() -> None:
    src = "def f(x):\n    # BEGIN SOLUTION double it\n    y = 2 * x\n    return y\n    # END SOLUTION\n\nprint(f(1))\n"
    assert strip_source(src) == "def f(x):\n    return None  # TODO: double it\n\nprint(f(1))\n"
    assert strip_source("a = 1\n") == "a = 1\n"
    with pytest.raises(ConfigError, match="without"):
        strip_source("    # BEGIN SOLUTION\n    x = 1\n")
    with pytest.raises(ConfigError, match="without"):
        strip_source("x = 1\n# END SOLUTION\n")


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_each_exercise_is_its_solution_stripped(solution: Path) -> None:
    exercise = solution.with_name(solution.stem + ".exercise.ipynb")
    assert exercise.exists(), f"write it with workbench.exercises.write_exercise({solution.name!r}, ...)"
    expected = strip_solutions(json.loads(solution.read_text()))
    assert json.loads(exercise.read_text()) == expected, "the exercise is stale: rewrite it from the solution"
    assert "TODO" in exercise.read_text() and "BEGIN SOLUTION" not in exercise.read_text()
    assert all(not c.get("outputs") for c in json.loads(solution.read_text())["cells"]), "store the solution clean"


def _run(path: Path, tmp_path: Path) -> None:
    import papermill as pm

    tmp_path.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(path), str(tmp_path / path.name), parameters={**LIGHT, "out_dir": str(tmp_path / "out")},
                        cwd=str(path.parent), kernel_name="python3", progress_bar=False)


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_the_solution_passes_every_check_and_the_exercise_fails_the_first(solution: Path, tmp_path: Path) -> None:
    import papermill as pm

    _run(solution, tmp_path / "solution")
    done = json.loads((tmp_path / "solution" / solution.name).read_text())
    printed = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                      for c in done["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert "Exercise 1: correct" in printed and "Exercise 3: correct" in printed
    with pytest.raises(pm.PapermillExecutionError) as failed:
        _run(solution.with_name(solution.stem + ".exercise.ipynb"), tmp_path / "exercise")
    assert failed.value.ename == "AssertionError" and "write it first" in failed.value.evalue
