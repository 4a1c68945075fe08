"""Packaging stays consistent: environment.yml mirrors pyproject's dependencies."""

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
    for extra in ("dev", "onnx"):
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
