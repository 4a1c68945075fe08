"""Fixtures for the browser tests: who runs them, the browser, a JupyterLab over a copy of notebooks/.

The browser tests take a few minutes on 2 CPU cores, so locally they are opt-in
(``WORKBENCH_E2E=1`` or ``make e2e``); CI (``CI=true``) always runs them, and there a missing
browser or driver is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import browserlab as bl
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"

#: Where screenshots are copied for a person to look at (``runs/`` is git-ignored already).
ARTIFACTS_ENV = "WORKBENCH_E2E_ARTIFACTS"
DEFAULT_ARTIFACTS = ROOT / "runs" / "e2e"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def in_ci() -> bool:
    return _truthy("CI")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: drives JupyterLab in headless Chromium (WORKBENCH_E2E=1; always in CI)")


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"browser test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the Chromium to drive; skips (fails under CI) when the browser test cannot run here."""
    if not (in_ci() or _truthy("WORKBENCH_E2E")):
        pytest.skip("browser test is opt-in locally: WORKBENCH_E2E=1 or `make e2e` (CI always runs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is missing: pip install -e '.[dev]'")
    exe = bl.chromium_path()
    if exe is None:
        _unavailable(f"no Chromium at {bl.DEFAULT_CHROMIUM} (set {bl.CHROMIUM_ENV}); "
                     "on Debian: apt-get install chromium (.ci/run does it as root)")
    return str(exe)


@pytest.fixture(scope="session")
def playwright(chromium: str) -> Iterator[object]:
    with bl.playwright_session() as pw:
        yield pw


#: The browser tests judge what a person sees (figures drawn, sliders that move the plot), not the
#: numbers: the copies they open run a lighter profile than the notebooks' defaults, which nbval
#: and tests/test_quickstart_results.py already execute in full.
LIGHT_PARAMETERS: dict[str, dict[str, object]] = {
    "00_quickstart.ipynb": {"seeds": [0], "limit_train": 640, "limit_test": 200, "n_calib": 64},
    "05_explorer.ipynb": {"epochs": 0.5, "limit_train": 1280, "n_eval": 200, "n_calib": 64},
}


def inject_parameters(path: Path, params: dict[str, object]) -> None:
    """Put an ``injected-parameters`` cell after the ``parameters`` cell: papermill's own code,
    so the browser sees what a papermill-executed notebook would hold."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(path)), params, kernel_name="python3", language="python",
                               comment="Parameters of the browser test (tests/e2e/conftest.py)")
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, playwright: object,
        chromium: str) -> Iterator[tuple[bl.LabServer, bl.Browser]]:
    """JupyterLab over a throwaway copy of notebooks/ (the repository's notebooks are never
    written) and a browser; both are shut down at the end, also when a test failed."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name, params in LIGHT_PARAMETERS.items():
        inject_parameters(root / name, params)
    # notebook results go to the temp folder, not to runs/notebooks in the repository
    env = {"WORKBENCH_OUT_ROOT": str(base / "out")}
    with bl.LabServer(root, base / "home", env=env) as server, bl.open_browser(playwright, chromium) as browser:
        yield server, browser


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[bl.Artifacts]:
    name = request.node.name.replace("/", "_").replace("[", "-").rstrip("]")
    stable_root = Path(os.environ.get(ARTIFACTS_ENV) or DEFAULT_ARTIFACTS)
    art = bl.Artifacts(tmp_path / "screenshots", stable_root / name)
    yield art
    art.publish()  # also after a failure: that is when a person most needs the pictures
