"""nbval runs each notebook at its defaults; their results go to a temporary folder, not runs/."""

from __future__ import annotations

import os
import shutil
import tempfile

#: The course notebooks are run by tests/test_course.py instead: their exercise versions fail on
#: purpose, and the solutions run there with lighter parameters.
collect_ignore_glob = ["course/*"]

_ENV = "WORKBENCH_OUT_ROOT"  # read by workbench.nbtools.default_out_root (the kernel inherits it)


def pytest_configure(config) -> None:
    if _ENV not in os.environ:
        config._workbench_out_root = tempfile.mkdtemp(prefix="workbench-nbval-")
        os.environ[_ENV] = config._workbench_out_root


def pytest_unconfigure(config) -> None:
    root = getattr(config, "_workbench_out_root", None)
    if root:
        os.environ.pop(_ENV, None)
        shutil.rmtree(root, ignore_errors=True)
