"""The public API: every name resolves, and ``import workbench`` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import workbench


def test_every_public_name_resolves_to_the_object_in_its_module():
    from workbench import data, errors, flatness, ptq, train, zoo

    assert workbench.load_data is data.load and workbench.fit is train.fit
    assert workbench.PTQConfig is ptq.PTQConfig and workbench.quantize_model is ptq.quantize_model
    assert workbench.LossHessian is flatness.LossHessian and workbench.WorkbenchError is errors.WorkbenchError
    assert workbench.load_zoo is zoo.load
    for name in workbench.__all__:
        assert getattr(workbench, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        workbench.nope  # noqa: B018


def test_import_workbench_loads_no_heavy_library():
    code = ("import sys, workbench; heavy = [m for m in ('torch', 'plotly', 'ipywidgets', 'papermill') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import workbench loaded {out}"


def test_the_cli_parser_loads_without_torch() -> None:
    """``workbench --help`` (building every subcommand's parser) must stay fast: no torch,
    numpy, plotly or papermill until a command runs."""
    code = ("import sys\nfrom workbench import cli\ncli.build_parser()\n"
            "print(sorted(m for m in ('torch', 'numpy', 'plotly', 'papermill', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_ptq_parser_offers_exactly_the_registered_observers() -> None:
    from workbench.cli.ptq import OBSERVER_NAMES
    from workbench.ptq.observers import OBSERVERS

    assert sorted(OBSERVER_NAMES) == sorted(OBSERVERS.names())


def test_the_readme_module_table_names_every_module() -> None:
    """The README's module table is the map of the package: every module is on it, by its dotted
    name, as ``.name`` after its package's first entry in a cell, or, for a package whose row lists
    its modules, as ``name`` in that row."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| module | what it does |"):]
    table = table[: table.index("\n\n")]
    named: set[str] = set()
    for line in table.splitlines()[2:]:
        cells = line.split("|")
        base = None
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            if name.startswith("workbench"):
                named.add(name)
                base = name.rsplit(".", 1)[0]
            elif name.startswith(".") and base:
                named.add(base + name)
        for pkg in re.findall(r"`(workbench(?:\.\w+)*)`", cells[1]):  # modules listed in the row's text
            named.update(f"{pkg}.{m}" for m in re.findall(r"`(\w+)`", cells[2]))
    modules = set()
    for path in (root / "workbench").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__main__" or parts[-1].startswith("_") and parts[-1] != "__init__":
            continue
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert sorted(modules - named) == []


def test_every_import_inside_the_package_resolves() -> None:
    """Commands and helpers import their compute code lazily, inside functions, where a wrong
    relative path only fails when that line first runs; check every one of them now."""
    import ast
    import importlib

    root = Path(__file__).resolve().parents[1]
    bad = []
    for path in sorted((root / "workbench").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        package = list(parts if parts[-1] == "__init__" else parts[:-1])
        package = [p for p in package if p != "__init__"]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            try:
                module = importlib.import_module(target)
            except ImportError as e:
                bad.append(f"{path.name}:{node.lineno}: {target} ({e})")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{target}.{alias.name}")
                    except ImportError:
                        bad.append(f"{path.name}:{node.lineno}: {target} has no {alias.name}")
    assert bad == []
