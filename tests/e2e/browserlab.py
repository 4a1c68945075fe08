"""Drive a real JupyterLab in headless Chromium and judge what the page shows.

Three small pieces, each usable alone:

* :class:`LabServer`: JupyterLab on ``127.0.0.1``, a free port and a random token, with every
  Jupyter folder (config, data, runtime, settings, workspaces) in a private temp folder, so a test
  can disable a front-end extension without touching the user's or the environment's setup.
* :func:`open_browser`: the system Chromium through Playwright (``executable_path``: Playwright's
  own browser downloads cannot work offline), with every request that is not for localhost aborted
  and recorded.
* :class:`NotebookPage`: open a notebook, run all cells, and :meth:`NotebookPage.report` what is
  on screen: cell errors, widget errors, sliders, plotly figures and their data.

The judgement (:meth:`PageReport.problems`) is a plain function of the report, so the tests can
show that it also *fails* on a deliberately broken front-end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: Environment variable naming the Chromium binary (Debian's package by default).
CHROMIUM_ENV = "WORKBENCH_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"

#: Flags Debian's Chromium needs to run as root, headless, with no network beyond localhost:
#: without the background-networking ones it tries to reach update and sync services and, on a
#: machine with no internet, connections get refused.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # small /dev/shm in containers makes tabs crash under load
)

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

#: JupyterLab user settings that make the page deterministic for a test:
#: every cell stays in the DOM (windowing would drop off-screen outputs), no autosave (the
#: served copy is thrown away anyway), and no news or update checks (they would go online).
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}

#: Lab extension names as ``jupyter labextension list`` prints them.
WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"
ANYWIDGET = "anywidget"
PLOTLY = "jupyterlab-plotly"


def chromium_path() -> str | None:
    """The Chromium binary to drive, or ``None`` when there is none."""
    exe = os.environ.get(CHROMIUM_ENV, DEFAULT_CHROMIUM)
    return exe if Path(exe).is_file() and os.access(exe, os.X_OK) else shutil.which("chromium")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------- artifacts


class Artifacts:
    """Screenshots and page reports of one test: under the test's tmp dir, copied to a stable
    folder (``runs/e2e/<test>``, or ``$WORKBENCH_E2E_ARTIFACTS/<test>``) when the test ends."""

    def __init__(self, tmp: Path, stable: Path) -> None:
        self.dir = tmp
        self.stable = stable
        tmp.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def save_report(self, name: str, report: PageReport, **extra: object) -> Path:
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps({**asdict(report), **extra}, indent=1, default=str))
        return path

    def publish(self) -> None:
        shutil.rmtree(self.stable, ignore_errors=True)
        shutil.copytree(self.dir, self.stable)


# ------------------------------------------------------------------------------------------- server


class _PortTaken(RuntimeError):
    """Someone took the free port between :func:`free_port` and the server binding it."""


class LabServer:
    """JupyterLab serving ``root_dir`` on 127.0.0.1 with a token, isolated in ``home``.

    Args:
        root_dir: the folder the file browser shows (notebooks are opened relative to it).
        home: private folder for Jupyter's config/data/runtime/settings; created if needed.
        disabled_extensions: lab extension names to disable through this server's own
            ``labconfig/page_config.json`` (the same file ``jupyter labextension disable`` writes).
        env: extra environment for the server and therefore its kernels.
        startup_timeout: seconds to wait for the server to answer.
    """

    def __init__(self, root_dir: Path, home: Path, *, disabled_extensions: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, startup_timeout: float = 180.0) -> None:
        self.root_dir = Path(root_dir)
        self.home = Path(home)
        self.disabled_extensions = tuple(disabled_extensions)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = self.home / "jupyterlab.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lab_url(self, path: str = "") -> str:
        """URL of the Lab page opening ``path`` (relative to ``root_dir``), token included."""
        tree = f"/tree/{path}" if path else ""
        return f"{self.url}/lab{tree}?token={self.token}"

    def _write_config(self) -> dict[str, str]:
        dirs = {name: self.home / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.set_disabled_extensions(self.disabled_extensions)
        for plugin, values in LAB_SETTINGS.items():
            path = dirs["settings"] / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        return {
            "JUPYTER_CONFIG_DIR": str(dirs["config"]),
            "JUPYTER_DATA_DIR": str(dirs["data"]),
            "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
            "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
            "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
            "IPYTHONDIR": str(dirs["ipython"]),
        }

    def set_disabled_extensions(self, names: Sequence[str]) -> None:
        """Disable these lab extensions (and enable every other) from the next page load on.

        The server reads ``labconfig/page_config.json`` on every request for the Lab page, so one
        running server can serve pages under different front-ends, one after another.
        """
        self.disabled_extensions = tuple(names)
        labconfig = self.home / "config" / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(
            json.dumps({"disabledExtensions": {name: True for name in self.disabled_extensions}}))

    def command(self) -> list[str]:
        # sys.executable: the server and its python3 kernel run in the test's own environment,
        # the one with the workbench installed.
        return [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.terminals_enabled=False",
            "--ServerApp.allow_root=True",  # CI runs as root; the server still listens on 127.0.0.1 only
            "--LabApp.extension_manager=readonly",  # the default one asks a package index about updates
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands, read cell models
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--MappingKernelManager.default_kernel_name=python3",
        ]

    def start(self, attempts: int = 3) -> LabServer:
        """Start the server and wait until it answers; a port taken in the meantime means another try."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> LabServer:
        env = {**os.environ, **self._write_config(), **self.extra_env}
        env.pop("JUPYTER_TOKEN", None)
        with open(self.log_path, "wb") as logf:
            # A session of its own: stop() can end the server and every kernel it started together.
            self._proc = subprocess.Popen(self.command(), cwd=self.root_dir, env=env, stdout=logf,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                if "already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"JupyterLab exited with {self._proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5) as r:
                    if r.status == 200:
                        log.info("JupyterLab up at %s", self.url)
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"JupyterLab did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to shut down (it stops its kernels), then make sure its process group is gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            req = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(req, timeout=10).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # kernels left behind (or a server that hung) share the group started above
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ browser


@dataclass
class Browser:
    """A Playwright browser context plus the requests it was not allowed to send."""

    context: Any
    blocked: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def new_page(self) -> Any:
        page = self.context.new_page()
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        return page


@contextmanager
def playwright_session() -> Iterator[Any]:
    """Playwright's driver, once per test session: its sync API allows only one per thread."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@contextmanager
def open_browser(pw: Any, executable: str, *, viewport: tuple[int, int] = (1400, 1500),
                 timeout_ms: float = 60_000) -> Iterator[Browser]:
    """Headless system Chromium; any request to a host other than localhost is aborted and recorded."""
    browser = pw.chromium.launch(executable_path=executable, headless=True, args=list(CHROMIUM_ARGS),
                                 chromium_sandbox=False, timeout=timeout_ms)
    try:
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                      service_workers="block")
        context.set_default_timeout(timeout_ms)
        out = Browser(context)

        def gate(route: Any) -> None:
            url = route.request.url
            if url.startswith(("data:", "blob:", "about:")) or urlsplit(url).hostname in LOCAL_HOSTS:
                route.continue_()
            else:
                out.blocked.append(url)
                route.abort()

        context.route("**/*", gate)
        yield out
    finally:
        browser.close()


# ----------------------------------------------------------------------------------------- notebook


def demo_notebook(path: Path, *, wired: bool = True) -> Path:
    """A tiny notebook with the explorer's shape: a bit-width IntSlider whose observer redraws a
    FigureWidget bar chart ("Accuracy at N bits"). No torch: it runs in seconds.

    ``wired=False`` leaves the observer out: the slider moves, the figure does not.
    """
    import nbformat

    code = [
        "import ipywidgets as W\nimport plotly.graph_objects as go",
        "def accuracy(bits):\n    return [100 - 80 / 2 ** (bits - 1), 100 - 60 / 2 ** (bits - 1)]\n"
        "fig = go.FigureWidget(go.Bar(x=['plain', 'dnq'], y=accuracy(8), texttemplate='%{y:.1f}'))\n"
        "fig.update_layout(title='Accuracy at 8 bits', yaxis_range=[0, 105], height=360)\n"
        "bits = W.IntSlider(value=8, min=2, max=8, description='weight bits', continuous_update=False)\n"
        "def redraw(change):\n    with fig.batch_update():\n        fig.data[0].y = accuracy(change['new'])\n"
        "        fig.layout.title = f\"Accuracy at {change['new']} bits\"\n"
        + ("bits.observe(redraw, names='value')\n" if wired else "") + "W.VBox([bits, fig])",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# demo: slider drives a figure")]
                                  + [nbformat.v4.new_code_cell(c) for c in code])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, str(path))
    return path


# Reads the page: DOM for what a person sees, the notebook's output models only to know which
# outputs are errors (JupyterLab renders an error and a stderr stream with the same mime type).
_REPORT_JS = r"""
() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const nb = panel && panel.content;
  const cells = [];
  if (nb && nb.widgets) {
    nb.widgets.forEach((cell, i) => {
      if (cell.model.type !== 'code') return;
      const outs = [];
      const om = cell.model.outputs;
      for (let j = 0; j < om.length; j++) {
        const o = om.get(j).toJSON();
        outs.push({type: o.output_type, ename: o.ename || null, evalue: o.evalue || null,
                   mimes: Object.keys(o.data || {})});
      }
      const prompt = cell.node.querySelector('.jp-InputPrompt');
      cells.push({index: i, prompt: prompt ? prompt.textContent.trim() : '',
                  execution_count: cell.model.executionCount, outputs: outs,
                  source: cell.model.sharedModel.getSource().slice(0, 80)});
    });
  }
  const root = (panel && panel.node) || document;
  const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const figures = [...root.querySelectorAll('.js-plotly-plot')].map((gd) => {
    const data = gd.data || [];
    const title = gd.querySelector('.gtitle');
    return {
      title: title ? title.textContent : ((gd.layout || {}).title || {}).text || '',
      traces: data.length,
      points: data.reduce((n, t) => n + ((t.y || t.z || t.values || []).length || 0), 0),
      drawn: gd.querySelectorAll('.main-svg .trace, .main-svg .point').length,
      visible: visible(gd) && !!gd.querySelector('.main-svg'),
      widget: !!gd.closest('.jupyter-widgets'),
      names: data.map((t) => t.name || null),
      legend: [...gd.querySelectorAll('.legendtext')].map((e) => e.textContent),
      y: data.map((t) => Array.from(t.y || [], Number)),
      bartext: [...gd.querySelectorAll('.bartext')].map((e) => e.textContent),
    };
  });
  const sliders = [...root.querySelectorAll('.widget-slider')].map((s) => ({
    label: (s.querySelector('.widget-label') || {}).textContent || '',
    readout: ((s.querySelector('.widget-readout') || {}).textContent || '').trim(),
    visible: visible(s) && !!s.querySelector('.noUi-handle'),
  }));
  const widgetErrors = [...root.querySelectorAll('.jp-OutputArea-output')]
    .filter((o) => o.classList.contains('jupyter-widgets-error-widget') || o.querySelector('.jupyter-widgets-error-widget')
            || /^(Error displaying widget|Loading widget\.\.\.)/.test(o.textContent.trim()))
    .map((o) => o.textContent.trim().slice(0, 200));
  const stderrTexts = [...root.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map((o) => o.textContent.trim().slice(0, 300));
  const session = panel && panel.sessionContext;
  return {
    path: panel && panel.context ? panel.context.path : null,
    kernel: session && session.session && session.session.kernel ? session.session.kernel.status : null,
    cells, figures, sliders, widget_errors: widgetErrors, stderr: stderrTexts,
  };
}
"""


@dataclass
class PageReport:
    """What one notebook page shows, as read from the browser."""

    path: str | None
    kernel: str | None
    cells: list[dict[str, Any]]
    figures: list[dict[str, Any]]
    sliders: list[dict[str, Any]]
    widget_errors: list[str]
    stderr: list[str]

    @classmethod
    def from_js(cls, d: Mapping[str, Any]) -> PageReport:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @property
    def errors(self) -> list[str]:
        """Every error output, as ``cell N: Name: value``."""
        return [f"cell {c['index']}: {o['ename']}: {o['evalue']}" for c in self.cells for o in c["outputs"]
                if o["type"] == "error"]

    @property
    def unexecuted(self) -> list[int]:
        return [c["index"] for c in self.cells if not c["execution_count"]]

    @property
    def plotly_outputs(self) -> int:
        """Outputs that carry a plotly figure (plain figures) or a widget view (FigureWidget, controls)."""
        return sum("application/vnd.plotly.v1+json" in o["mimes"] for c in self.cells for o in c["outputs"])

    def rendered_figures(self) -> list[dict[str, Any]]:
        """Plotly figures that are on screen, drawn, and have at least one data point."""
        return [f for f in self.figures if f["visible"] and f["traces"] and f["points"] and f["drawn"]]

    def slider(self, label: str) -> dict[str, Any] | None:
        return next((s for s in self.sliders if s["visible"] and s["label"].strip() == label), None)

    def figure(self, title_contains: str) -> dict[str, Any] | None:
        return next((f for f in self.rendered_figures() if title_contains in f["title"]), None)

    def notices(self) -> list[str]:
        """Oddities a person would notice that do not make the page wrong (reported as warnings)."""
        return [f"figure {f['title']!r} shows a legend entry {t!r}: a trace name did not reach the browser"
                for f in self.rendered_figures() for t in f.get("legend", []) if re.fullmatch(r"trace \d+", t)]

    def problems(self, *, min_figures: int = 1, sliders: Sequence[str] = (), figure_titles: Sequence[str] = (),
                 widget_figures: bool = False) -> list[str]:
        """Everything wrong with the page; an empty list means it shows what a person should see.

        Args:
            min_figures: rendered plotly figures the page must show (0 to skip).
            sliders: slider labels that must be rendered.
            figure_titles: a rendered figure must have a title containing each of these.
            widget_figures: the required figures must be FigureWidgets (drawn by a widget view).
        """
        out = [f"error output: {e}" for e in self.errors]
        out += [f"widget not rendered: {e!r}" for e in self.widget_errors]
        out += [f"cell {i} was not executed" for i in self.unexecuted]
        if self.kernel not in ("idle", None):
            out.append(f"kernel is {self.kernel}, not idle")
        figs = [f for f in self.rendered_figures() if f["widget"] or not widget_figures]
        if len(figs) < min_figures:
            out.append(f"{len(figs)} rendered plotly figure(s) with data, expected at least {min_figures}"
                       f" (figures in the page: {[(f['title'], f['traces'], f['points'], f['drawn']) for f in self.figures]})")
        unrendered = [f["title"] or "(untitled)" for f in self.figures if f not in self.rendered_figures()]
        out += [f"figure {t!r} is empty or not drawn" for t in unrendered]
        if self.plotly_outputs > len([f for f in self.rendered_figures() if not f["widget"]]):
            out.append(f"{self.plotly_outputs} plotly outputs but only "
                       f"{len([f for f in self.rendered_figures() if not f['widget']])} drawn figures")
        out += [f"slider {s!r} is not rendered (sliders: {[x['label'] for x in self.sliders]})"
                for s in sliders if self.slider(s) is None]
        out += [f"no rendered figure titled like {t!r}" for t in figure_titles
                if not any(t in f["title"] for f in figs)]
        return out


@dataclass
class SliderMove:
    """One slider move and the page before and after it."""

    label: str
    key: str
    figure_title: str
    before: PageReport
    after: PageReport

    def _fig(self, report: PageReport) -> dict[str, Any] | None:
        return report.figure(self.figure_title)

    def _readout(self, report: PageReport) -> str | None:
        s = report.slider(self.label)
        return s["readout"] if s else None

    def problems(self) -> list[str]:
        """Empty when the slider's readout moved and the figure now plots other values."""
        b, a = self._fig(self.before), self._fig(self.after)
        rb, ra = self._readout(self.before), self._readout(self.after)
        out = []
        if rb is None or ra is None or rb == ra:
            out.append(f"slider {self.label!r} did not move on {self.key!r}: readout {rb!r} -> {ra!r}")
        if b is None or a is None:
            out.append(f"no rendered figure titled like {self.figure_title!r} before/after the move")
        elif a["y"] == b["y"]:
            out.append(f"figure {a['title']!r} still plots {a['y']} after moving {self.label!r} {rb} -> {ra}")
        return out + [f"after the move: {p}" for p in self.after.problems(min_figures=0)]

    def summary(self) -> dict[str, Any]:
        b, a = self._fig(self.before), self._fig(self.after)
        return {"slider": self.label, "key": self.key, "readout": [self._readout(self.before), self._readout(self.after)],
                "title": [b and b["title"], a and a["title"]], "y": [b and b["y"], a and a["y"]],
                "bartext": [b and b["bartext"], a and a["bartext"]]}


class NotebookPage:
    """One notebook open in JupyterLab, in one browser page."""

    def __init__(self, browser: Browser, server: LabServer, path: str) -> None:
        self.browser = browser
        self.server = server
        self.path = path
        self.page = browser.new_page()
        self.ran_ok: bool | None = None  # what run_all() said: None before it ran

    def open(self, timeout_s: float = 240.0) -> NotebookPage:
        """Load Lab with the notebook and wait until its kernel is idle."""
        self.page.goto(self.server.lab_url(self.path), wait_until="domcontentloaded", timeout=timeout_s * 1000)
        self.page.wait_for_function(
            """(path) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                 return !!(w && w.context && w.context.path === path && w.content && w.content.widgets
                           && w.content.widgets.length && w.sessionContext.session
                           && w.sessionContext.session.kernel
                           && w.sessionContext.session.kernel.status === 'idle'); }""",
            arg=self.path, timeout=timeout_s * 1000, polling=500)
        # more room for the notebook in screenshots: fold the file browser away
        self.page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        return self

    def run_all(self, timeout_s: float = 900.0) -> bool:
        """Run every cell (the menu's *Run All Cells*) and wait until it finished; True if all succeeded.

        Stored outputs and execution counts are cleared first, so what the page shows afterwards
        comes from this run only (a cell skipped after an error shows no execution count).
        """
        self.page.evaluate("""() => { window.__e2eRun = null;
            const cmd = window.jupyterapp.commands;
            cmd.execute('notebook:clear-all-cell-outputs')
              .then(() => cmd.execute('notebook:run-all-cells'))
              .then((ok) => { window.__e2eRun = {ok: ok !== false}; })
              .catch((e) => { window.__e2eRun = {ok: false, error: String(e)}; }); }""")
        handle = self.page.wait_for_function("() => window.__e2eRun", timeout=timeout_s * 1000, polling=1000)
        result = handle.json_value()
        self.wait_idle(timeout_s)
        self.ran_ok = bool(result.get("ok"))
        return self.ran_ok

    def wait_idle(self, timeout_s: float = 300.0) -> None:
        self.page.wait_for_function(
            """() => { const w = window.jupyterapp.shell.currentWidget;
                 const k = w.sessionContext.session && w.sessionContext.session.kernel;
                 return k && k.status === 'idle'
                   && ![...w.node.querySelectorAll('.jp-InputPrompt')].some((p) => p.textContent.includes('*')); }""",
            timeout=timeout_s * 1000, polling=500)

    def wait_rendered(self, timeout_s: float = 120.0, settle_s: float = 1.0, **checks: Any) -> PageReport:
        """Poll :meth:`report` until :meth:`PageReport.problems` is empty (or time is up); the last report."""
        deadline = time.monotonic() + timeout_s
        while True:
            report = self.report()
            if not report.problems(**checks) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        time.sleep(settle_s)  # let plotly finish its transitions before anyone takes a picture
        return self.report()

    def report(self) -> PageReport:
        return PageReport.from_js(self.page.evaluate(_REPORT_JS))

    def press_slider(self, label: str, key: str) -> None:
        """Focus the handle of the slider labelled ``label`` and press ``key`` (as a person would)."""
        slider = self.page.locator(".widget-slider", has=self.page.locator(".widget-label", has_text=label))
        handle = slider.first.locator(".noUi-handle")
        handle.scroll_into_view_if_needed()
        handle.focus()
        handle.press(key)

    def move_slider(self, label: str, key: str, figure_title: str, timeout_s: float = 300.0) -> SliderMove:
        """Press ``key`` on slider ``label`` and wait until the figure titled like ``figure_title``
        plots other y values (or ``timeout_s`` passes); what the page showed before and after."""
        before = self.report()
        if before.slider(label) is None:  # nothing a person could move: SliderMove.problems() says so
            return SliderMove(label, key, figure_title, before, before)
        fig = before.figure(figure_title)
        old_y = fig["y"] if fig else None
        self.press_slider(label, key)
        deadline = time.monotonic() + timeout_s
        while True:
            after = self.report()
            fig = after.figure(figure_title)
            if fig is not None and fig["y"] != old_y and after.kernel == "idle":
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        self.wait_idle()
        time.sleep(1.0)  # plotly redraw
        return SliderMove(label, key, figure_title, before, self.report())

    def output_with_slider(self, label: str) -> Any:
        """Locator of the cell output that holds the slider labelled ``label`` (e.g. the explorer)."""
        label_loc = self.page.locator(".widget-slider .widget-label", has_text=label)
        return self.page.locator(".jp-OutputArea-child", has=label_loc).first

    def figure_outputs(self) -> Any:
        """Locator of every cell output that holds a plotly figure."""
        return self.page.locator(".jp-OutputArea-child", has=self.page.locator(".js-plotly-plot"))

    def screenshot(self, path: Path, element: Any = None) -> Path | None:
        """The whole window, or one element (a Playwright locator) scrolled into view; ``None``
        when the element is not on the page (the checks say why, a picture of nothing would not)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if element is not None:
            if element.count() == 0:
                return None
            element.scroll_into_view_if_needed()
            element.screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        self.page.close()
