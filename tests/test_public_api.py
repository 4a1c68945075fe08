"""The public API: every name resolves, and ``import workbench`` stays light."""

from __future__ import annotations

import subprocess
import sys

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
