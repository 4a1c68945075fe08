"""The notebooks as a person sees them: JupyterLab in headless Chromium, all cells run, the page judged.

* 05_explorer: no error output, the bit sliders and the accuracy FigureWidget are rendered with
  data, and moving the weight-bit slider changes the plotted accuracy.
* 00_quickstart: no error output and every plotly figure it outputs is drawn.
* The judge itself: on a small slider+FigureWidget notebook it passes with a healthy front-end,
  fails when the slider is not wired to the figure, and fails with the anywidget or widget-manager
  lab extension disabled (through a private page_config.json; nothing global changes).

Screenshots go to the test's tmp dir and to ``runs/e2e/<test>/`` for a person to look at.
"""

from __future__ import annotations

import json
from pathlib import Path

import browserlab as bl
import pytest
from browserlab import Artifacts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

EXPLORER = "05_explorer.ipynb"
QUICKSTART = "00_quickstart.ipynb"
BIT_SLIDERS = ("weight bits", "activation bits")
ACCURACY_TITLE = "Accuracy"  # QuantExplorer's accuracy figure: "Accuracy after PTQ at W8A8 ..."
EXPLORER_OUTPUT = ".jp-OutputArea-output:has(.widget-slider)"


def _explain(problems: list[str], server: bl.LabServer, browser: bl.Browser) -> str:
    return "\n".join(["the page is not right:", *problems, "--- browser console errors:",
                      *browser.console_errors[-10:], "--- JupyterLab log:", server.log_tail(30)])


def _run(lab: tuple[bl.LabServer, bl.Browser], path: str) -> bl.NotebookPage:
    server, browser = lab
    if not (server.root_dir / path).is_file():
        pytest.skip(f"notebooks/{path} does not exist yet")
    nb = bl.NotebookPage(browser, server, path).open()
    nb.run_all()
    return nb


def test_explorer_renders_and_sliders_drive_accuracy(lab: tuple[bl.LabServer, bl.Browser],
                                                     artifacts: Artifacts) -> None:
    server, browser = lab
    nb = _run(lab, EXPLORER)
    checks = dict(min_figures=1, sliders=BIT_SLIDERS, figure_titles=[ACCURACY_TITLE], widget_figures=True)
    before = nb.wait_rendered(timeout_s=180, **checks)
    artifacts.save_report("before", before)
    nb.screenshot(artifacts.path("explorer_before.png"))
    nb.screenshot(artifacts.path("explorer_widget_before.png"), EXPLORER_OUTPUT)
    assert not before.problems(**checks), _explain(before.problems(**checks), server, browser)

    # Home = the slider's minimum, the harshest setting, unless it already sits there.
    slider = before.slider("weight bits")
    key = "End" if slider and slider["readout"] == "2" else "Home"
    move = nb.move_slider("weight bits", key, ACCURACY_TITLE)
    artifacts.save_report("after", move.after, move=move.summary())
    nb.screenshot(artifacts.path("explorer_after.png"))
    nb.screenshot(artifacts.path("explorer_widget_after.png"), EXPLORER_OUTPUT)
    assert not move.problems(), _explain(move.problems(), server, browser)
    assert not browser.blocked, f"requests beyond localhost: {browser.blocked}"


def test_quickstart_draws_every_figure(lab: tuple[bl.LabServer, bl.Browser], artifacts: Artifacts) -> None:
    server, browser = lab
    nb = _run(lab, QUICKSTART)
    report = nb.wait_rendered(timeout_s=120, min_figures=1)
    artifacts.save_report("quickstart", report)
    nb.screenshot(artifacts.path("quickstart.png"))
    figures = nb.page.locator('.jp-OutputArea-output:has(.js-plotly-plot)')
    for i in range(figures.count()):
        figures.nth(i).screenshot(path=str(artifacts.path(f"quickstart_figure_{i}.png")))
    problems = report.problems(min_figures=max(1, report.plotly_outputs))
    assert not problems, _explain(problems, server, browser)
    assert report.plotly_outputs >= 1, "00_quickstart output no plotly figure at all"
    assert not browser.blocked, f"requests beyond localhost: {browser.blocked}"


# ------------------------------------------------------------------------ the judge can say no


def _demo(tmp_path: Path, chromium: str, disabled: tuple[str, ...], artifacts: Artifacts,
          notebooks: dict[str, bool]) -> dict[str, tuple[list[str], list[str]]]:
    """Run the demo notebooks under a front-end with ``disabled`` extensions; per notebook the
    page problems and the slider-move problems."""
    root = tmp_path / "root"
    root.mkdir()
    for name, wired in notebooks.items():
        bl.demo_notebook(root / name, wired=wired)
    out = {}
    with bl.LabServer(root, tmp_path / "home", disabled_extensions=disabled) as server, \
            bl.open_browser(chromium) as browser:
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


def test_judge_passes_a_healthy_front_end_and_catches_an_unwired_slider(
        tmp_path: Path, chromium: str, artifacts: Artifacts) -> None:
    res = _demo(tmp_path, chromium, (), artifacts, {"demo.ipynb": True, "demo_unwired.ipynb": False})
    assert res["demo.ipynb"] == ([], []), res["demo.ipynb"]
    page, move = res["demo_unwired.ipynb"]
    assert page == [], page
    assert any("still plots" in p for p in move), move


@pytest.mark.parametrize("disabled", [bl.ANYWIDGET, bl.WIDGET_MANAGER])
def test_judge_fails_on_a_broken_front_end(tmp_path: Path, chromium: str, artifacts: Artifacts,
                                           disabled: str) -> None:
    page, move = _demo(tmp_path, chromium, (disabled,), artifacts, {"demo.ipynb": True})["demo.ipynb"]
    assert any("rendered plotly figure" in p for p in page), page
    assert move, "a slider move cannot be judged good when the figure is not there"


def test_judge_without_a_browser() -> None:
    """The judgement is plain data in, problems out: error outputs, stuck widgets, empty figures."""
    fig = {"title": "Accuracy after PTQ at W8A8", "traces": 2, "points": 4, "drawn": 6, "visible": True,
           "widget": True, "y": [[90.0, 91.0], [88.0, 89.0]], "bartext": []}
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

    moved = bl.SliderMove("weight bits", "Home", "Accuracy", good, good)
    assert any("did not move" in p for p in moved.problems())
    assert any("still plots" in p for p in moved.problems())


def test_notebooks_folder_is_there() -> None:
    assert (NOTEBOOKS / QUICKSTART).is_file()
