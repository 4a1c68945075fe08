"""The browser judge can say no: the same checks that pass the real notebooks fail on a broken page.

A small notebook with the explorer's shape (a bit slider whose observer redraws a FigureWidget)
is judged under a healthy front-end (must pass), with the slider not wired to the figure (the
slider check must fail), and with the anywidget or the widget-manager lab extension disabled
(the figure check must fail). Extensions are disabled through the test server's own
``labconfig/page_config.json`` (what ``jupyter labextension disable`` writes), so nothing global
changes; the server reads it on every page load, so one server serves all three front-ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import browserlab as bl
import pytest
from browserlab import Artifacts

#: The demo notebooks, one per front-end they are judged under (a fresh kernel each).
DEMOS = {"demo.ipynb": True, "demo_unwired.ipynb": False, "demo_anywidget_off.ipynb": True,
         "demo_manager_off.ipynb": True}


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[bl.LabServer]:
    """One JupyterLab for every judge test (starting one costs tens of seconds on 2 cores); each
    test sets the extensions it disables before it opens its pages."""
    base = tmp_path_factory.mktemp("judge")
    root = base / "root"
    root.mkdir()
    for name, wired in DEMOS.items():
        bl.demo_notebook(root / name, wired=wired)
    with bl.LabServer(root, base / "home") as server:
        yield server


def _demo(server: bl.LabServer, pw: object, chromium: str, disabled: tuple[str, ...], artifacts: Artifacts,
          notebooks: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Run the demo notebooks under a front-end with ``disabled`` extensions; per notebook the
    page problems and the slider-move problems."""
    server.set_disabled_extensions(disabled)
    out = {}
    with bl.open_browser(pw, chromium) as browser:
        for name in notebooks:
            nb = bl.NotebookPage(browser, server, name).open()
            nb.run_all()
            checks = dict(min_figures=1, sliders=["weight bits"], figure_titles=["Accuracy"], widget_figures=True)
            report = nb.wait_rendered(timeout_s=30, **checks)
            nb.screenshot(artifacts.path(f"{Path(name).stem}.png"))
            page_problems = report.problems(**checks)
            move_problems = nb.move_slider("weight bits", "Home", "Accuracy", timeout_s=20).problems()
            artifacts.path(f"{Path(name).stem}.json").write_text(json.dumps(
                {"page": page_problems, "move": move_problems, "blocked": browser.blocked}, indent=1))
            out[name] = (page_problems, move_problems)
            nb.close()
    return out


@pytest.mark.e2e
@pytest.mark.slow
def test_judge_passes_a_healthy_front_end_and_catches_an_unwired_slider(
        judge_server: bl.LabServer, playwright: object, chromium: str, artifacts: Artifacts) -> None:
    res = _demo(judge_server, playwright, chromium, (), artifacts, ["demo.ipynb", "demo_unwired.ipynb"])
    assert res["demo.ipynb"] == ([], []), res["demo.ipynb"]
    page, move = res["demo_unwired.ipynb"]
    assert page == [], page
    assert any("still plots" in p for p in move), move


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("disabled, notebook", [(bl.ANYWIDGET, "demo_anywidget_off.ipynb"),
                                                (bl.WIDGET_MANAGER, "demo_manager_off.ipynb")])
def test_judge_fails_on_a_broken_front_end(judge_server: bl.LabServer, playwright: object, chromium: str,
                                           artifacts: Artifacts, disabled: str, notebook: str) -> None:
    page, move = _demo(judge_server, playwright, chromium, (disabled,), artifacts, [notebook])[notebook]
    assert any("rendered plotly figure" in p for p in page), page
    assert move, "a slider move cannot be judged good when the figure is not there"


def test_judge_without_a_browser() -> None:
    """The judgement is plain data in, problems out: error outputs, stuck widgets, empty figures."""
    fig = {"title": "Accuracy after PTQ at W8A8", "traces": 2, "points": 4, "drawn": 6, "visible": True,
           "widget": True, "names": ["full precision", "W8A8"], "legend": [], "y": [[90.0, 91.0], [88.0, 89.0]],
           "bartext": []}
    cell = {"index": 1, "prompt": "[1]:", "execution_count": 1, "source": "",
            "outputs": [{"type": "display_data", "ename": None, "evalue": None,
                         "mimes": ["application/vnd.jupyter.widget-view+json"]}]}
    good = bl.PageReport("x.ipynb", "idle", [cell], [fig], [{"label": "weight bits", "readout": "8", "visible": True}],
                         [], [])
    checks = dict(min_figures=1, sliders=["weight bits"], figure_titles=["Accuracy"], widget_figures=True)
    assert good.problems(**checks) == []

    err = {**cell, "outputs": [{"type": "error", "ename": "ValueError", "evalue": "boom", "mimes": []}]}
    unrun = {**cell, "index": 2, "execution_count": None}
    bad = bl.PageReport("x.ipynb", "busy", [err, unrun], [{**fig, "points": 0}], [], ["Error displaying widget"], [])
    text = "\n".join(bad.problems(**checks))
    for needle in ("ValueError: boom", "Error displaying widget", "cell 2 was not executed", "kernel is busy",
                   "0 rendered plotly figure", "slider 'weight bits'", "is empty or not drawn"):
        assert needle in text, (needle, text)

    assert good.notices() == []
    unnamed = bl.PageReport("x.ipynb", "idle", [cell], [{**fig, "legend": ["trace 0", "W8A8"]}], [], [], [])
    assert "trace 0" in unnamed.notices()[0]

    moved = bl.SliderMove("weight bits", "Home", "Accuracy", good, good)
    assert any("did not move" in p for p in moved.problems())
    assert any("still plots" in p for p in moved.problems())
