"""Packaging stays consistent: environment.yml mirrors pyproject's dependencies."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    """pyproject.toml's ``[project]`` table."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (pyproject allows it): the tomli backport, or skip
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    py = _pyproject()
    wanted = {_name(r) for r in py["dependencies"]}
    for extra in ("dev", "onnx", "xcheck"):
        wanted |= {_name(r) for r in py["optional-dependencies"][extra]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    have = {_name(r) for r in pip if not r.startswith("-e")}
    assert have == wanted, f"only in environment.yml: {have - wanted}; only in pyproject: {wanted - have}"
    assert "-e ." in pip


def test_console_script_and_layout():
    py = _pyproject()
    assert py["scripts"]["workbench"] == "workbench.cli:main"
    for d in ("notebooks", "workbench", "data", "tests", "benchmarks", ".ci"):
        assert (ROOT / d).is_dir(), d
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_lint_clean():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "ruff", "check", "workbench", "tests", "benchmarks"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists the packages explicitly (data/, notebooks/ and docs/results/ are mapped in):
    a new sub-package must be added there, or the wheel would ship without it."""
    try:
        import tomllib
    except ModuleNotFoundError:
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    from workbench.bundled import BUNDLED

    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "workbench").rglob("__init__.py")}
    # the repository folders that travel inside the package: workbench.bundled finds them there
    mapped = {f"workbench.{inside}": repo for repo, inside in BUNDLED.values()}
    assert found | set(mapped) == set(tool["packages"])
    assert tool["package-dir"] == mapped


def test_notebooks_command_copies_and_never_overwrites_silently(tmp_path, capsys):
    from workbench import cli

    dest = tmp_path / "course"
    assert cli.main(["notebooks", str(dest), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    names = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(p.name for p in dest.glob("*.ipynb")) == names and len(got["files"]) >= len(names)
    assert (dest / "00_quickstart.ipynb").read_bytes() == (ROOT / "notebooks" / "00_quickstart.ipynb").read_bytes()
    course = sorted(p.name for p in (ROOT / "notebooks" / "course").glob("*.ipynb"))
    assert course and sorted(p.name for p in (dest / "course").glob("*.ipynb")) == course
    (dest / "00_quickstart.ipynb").write_text("my edits")
    assert cli.main(["notebooks", str(dest)]) == 6  # an output-folder error: nothing replaced
    assert "--overwrite" in capsys.readouterr().err
    assert (dest / "00_quickstart.ipynb").read_text() == "my edits"
    assert cli.main(["notebooks", str(dest), "--overwrite"]) == 0
    assert (dest / "00_quickstart.ipynb").read_bytes() == (ROOT / "notebooks" / "00_quickstart.ipynb").read_bytes()
