"""The notebooks as a person sees them: JupyterLab in headless Chromium, all cells run, the page judged.

* 05_explorer: no error output, the bit sliders and the accuracy FigureWidget are rendered with
  data, and moving the weight-bit slider changes the plotted accuracy.
* 00_quickstart: no error output and every plotly figure it outputs is drawn.
* That the judge can say no: test_judge.py.

Screenshots go to the test's tmp dir and to ``runs/e2e/<test>/`` for a person to look at.
"""

from __future__ import annotations

import warnings

import browserlab as bl
import pytest
from browserlab import Artifacts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPLORER = "05_explorer.ipynb"
QUICKSTART = "00_quickstart.ipynb"
BIT_SLIDERS = ("weight bits", "activation bits")
ACCURACY_TITLE = "Accuracy"  # QuantExplorer's accuracy figure: "Accuracy after PTQ at W8A8 ..."


def _run_problems(nb: bl.NotebookPage) -> list[str]:
    return [] if nb.ran_ok else ["Run All Cells did not complete (a cell failed or was interrupted)"]


def _warn_notices(report: bl.PageReport) -> None:
    for notice in report.notices():
        warnings.warn(notice, stacklevel=2)


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
    nb.screenshot(artifacts.path("explorer_widget_before.png"), nb.output_with_slider("weight bits"))
    problems = _run_problems(nb) + before.problems(**checks)
    assert not problems, _explain(problems, server, browser)

    # Home = the slider's minimum, the harshest setting, unless it already sits there.
    slider = before.slider("weight bits")
    key = "End" if slider and slider["readout"] == "2" else "Home"
    move = nb.move_slider("weight bits", key, ACCURACY_TITLE)
    artifacts.save_report("after", move.after, move=move.summary())
    nb.screenshot(artifacts.path("explorer_after.png"))
    nb.screenshot(artifacts.path("explorer_widget_after.png"), nb.output_with_slider("weight bits"))
    assert not move.problems(), _explain(move.problems(), server, browser)
    _warn_notices(move.after)
    assert not browser.blocked, f"requests beyond localhost: {browser.blocked}"


def test_quickstart_draws_every_figure(lab: tuple[bl.LabServer, bl.Browser], artifacts: Artifacts) -> None:
    server, browser = lab
    nb = _run(lab, QUICKSTART)
    report = nb.wait_rendered(timeout_s=120, min_figures=1)
    artifacts.save_report("quickstart", report)
    nb.screenshot(artifacts.path("quickstart.png"))
    figures = nb.figure_outputs()
    for i in range(figures.count()):
        nb.screenshot(artifacts.path(f"quickstart_figure_{i}.png"), figures.nth(i))
    problems = _run_problems(nb) + report.problems(min_figures=max(1, report.plotly_outputs))
    assert not problems, _explain(problems, server, browser)
    assert report.plotly_outputs >= 1, "00_quickstart output no plotly figure at all"
    _warn_notices(report)
    assert not browser.blocked, f"requests beyond localhost: {browser.blocked}"
