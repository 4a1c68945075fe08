"""``make_report``: one tidy CSV and one HTML page from a run or a sweep folder."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..runinfo import write_csv

log = logging.getLogger(__name__)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("skipping unreadable %s: %s", path, e)
        return None


def _tables(results: Path) -> dict[str, list[dict[str, Any]]]:
    """Every tidy table (``NAME.json`` holding a list of dicts) directly in a results folder."""
    out = {}
    for p in sorted(results.glob("*.json")):
        rows = _read_json(p)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            out[p.stem] = rows
    return out


def collect_results(folder: str | Path) -> dict[str, Any]:
    """Gather a run's or a sweep's results: kind, units (one per notebook or job) and summary rows.

    Each summary row is a notebook's ``summary`` table row with ``unit`` (notebook name or job id),
    ``notebook`` and, for sweeps, the grid values in front.

    Raises:
        RunDirError: the folder is neither a run nor a sweep.
    """
    folder = Path(folder)
    if (folder / "sweep.json").is_file():
        meta, kind = _read_json(folder / "sweep.json") or {}, "sweep"
        status = {r["job"]: r for r in (_read_json(folder / "summary.json") or [])}
        units = [(d.name, d / "results", status.get(d.name, {}),
                  (status.get(d.name) or {}).get("point") or _point_of(meta, d.name))
                 for d in sorted((folder / "jobs").glob("*")) if d.is_dir()]
        notebook = meta.get("notebook", "")
    elif (folder / "run.json").is_file() and (folder / "results").is_dir():
        meta, kind = _read_json(folder / "run.json") or {}, "run"
        status = {r["notebook"]: r for r in (_read_json(folder / "summary.json") or [])}
        units = [(d.name, d, status.get(d.name, {}), {}) for d in sorted((folder / "results").glob("*")) if d.is_dir()]
        notebook = None
    elif (folder / "run.json").is_file():  # one notebook's own output folder
        meta, kind = _read_json(folder / "run.json") or {}, "notebook"
        units = [(meta.get("notebook") or folder.name, folder, {}, {})]
        notebook = meta.get("notebook")
    elif any((d / "run.json").is_file() for d in folder.glob("*")):
        # a folder of notebook output folders (runs/notebooks): the latest one of each notebook
        latest: dict[str, Path] = {}
        for d in sorted(p for p in folder.glob("*") if (p / "run.json").is_file()):
            latest[(_read_json(d / "run.json") or {}).get("notebook") or d.name] = d
        meta, kind, notebook = {}, "folder", None
        units = [(name, d, {"status": "ok"}, {}) for name, d in sorted(latest.items())]
    else:
        raise RunDirError(f"{folder} holds no workbench run or sweep (no run.json or sweep.json)")
    rows: list[dict[str, Any]] = []
    unit_info = []
    for name, results, st, point in units:
        tables = _tables(results) if results.is_dir() else {}
        nb = notebook or name
        for r in tables.get("summary", []):
            rows.append({"unit": name, "notebook": nb, **point, **r})
        unit_info.append({"unit": name, "notebook": nb, "point": point, "status": st.get("status", "unknown"),
                          "seconds": st.get("seconds"), "error": st.get("message"), "html": st.get("html"),
                          "results": str(results), "tables": tables,
                          "figures": sorted(str(p) for p in (results / "figures").glob("*.html"))
                          if results.is_dir() else []})
    return {"kind": kind, "meta": meta, "units": unit_info, "rows": rows}


def _point_of(meta: dict[str, Any], job: str) -> dict[str, Any]:
    pts = meta.get("points") or []
    i = int(job) if job.isdigit() else -1
    return pts[i] if 0 <= i < len(pts) else {}


def _html_table(rows: Sequence[dict[str, Any]], limit: int = 200) -> str:
    from ..tables import Table

    if not rows:
        return "<p><i>(no rows)</i></p>"
    more = f"<p><i>{len(rows) - limit} more rows in the CSV.</i></p>" if len(rows) > limit else ""
    return Table(rows[:limit])._repr_html_() + more


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right;font-size:90%}th{background:#f3f3f3}caption{text-align:left;font-weight:bold}"
        ".failed{color:#b00}")


def make_report(folder: str | Path, *, out: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Aggregate a run or a sweep into ``report.csv`` (every summary row, tidy) and ``report.html``
    (status of each notebook/job, the summary rows, each notebook's tables, links to figures and
    executed notebooks), written into ``out`` (default: ``folder``).

    Raises:
        RunDirError: not a run/sweep folder, or a report exists and ``overwrite`` is False.
    """
    import html as _h

    folder = Path(folder)
    res = collect_results(folder)
    dest = Path(out) if out is not None else folder
    csv_path, html_path = dest / "report.csv", dest / "report.html"
    if not overwrite and (csv_path.exists() or html_path.exists()):
        raise RunDirError(f"{folder} already has a report; pass overwrite=True (--overwrite) to replace it")
    write_csv(csv_path, res["rows"])

    def link(p: str | None, text: str) -> str:
        if not p:
            return ""
        rel = os.path.relpath(p, dest)
        return f'<a href="{_h.escape(rel)}">{_h.escape(text)}</a>'

    title = f"workbench {res['kind']} report: {folder.name}"
    status_rows = [{res["kind"] == "sweep" and "job" or "notebook": u["unit"], **u["point"],
                    "status": u["status"], "seconds": u["seconds"], "error": u["error"] or ""}
                   for u in res["units"]]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_h.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_h.escape(title)}</h1>"]
    git = (res["meta"].get("git") or {})
    parts.append(f"<p>made {time.strftime('%Y-%m-%d %H:%M')}; git commit {_h.escape(str(git.get('commit')))}"
                 f"{' (dirty)' if git.get('dirty') else ''}; profile {_h.escape(str(res['meta'].get('profile', '-')))}"
                 f"; {len(res['rows'])} summary rows in <a href='report.csv'>report.csv</a></p>")
    parts.append("<h2>Status</h2>" + _html_table(status_rows))
    parts.append("<h2>Summary</h2>" + _html_table(res["rows"]))
    for u in res["units"]:
        cls = " class='failed'" if u["status"] == "failed" else ""
        parts.append(f"<h2{cls}>{_h.escape(u['unit'])} ({_h.escape(u['status'])})</h2>")
        links = [link(u["html"], "executed notebook")] + [link(f, Path(f).stem) for f in u["figures"]]
        if any(links):
            parts.append("<p>" + " · ".join(x for x in links if x) + "</p>")
        for name, rows in u["tables"].items():
            if name != "summary":
                parts.append(f"<h3>{_h.escape(name)}</h3>" + _html_table(rows, limit=50))
    parts.append("</body></html>")
    from ..runinfo import atomic_write_text

    atomic_write_text(html_path, "\n".join(parts))
    return {"csv": csv_path, "html": html_path}


def format_summary(rows: Iterable[dict[str, Any]]) -> str:
    """Fixed-width text of run/sweep rows for the terminal, failures with their cell."""
    lines = []
    for r in rows:
        name = r.get("job") and f"job {r['job']} {json.dumps(r.get('point', {}))}" or r.get("notebook", "?")
        secs = f"{r.get('seconds', 0) or 0:7.1f} s"
        if r.get("status") == "ok":
            lines.append(f"  ok      {secs}  {name}")
        else:
            where = f"cell [{r['exec_count']}]" if r.get("exec_count") is not None else "a cell"
            lines.append(f"  FAILED  {secs}  {name}: {where} raised {r.get('error_name')}: "
                         f"{_one_line(r.get('error_value'))}")
    return "\n".join(lines)


def _one_line(s: Any, n: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(s or "")).strip()
    return text if len(text) <= n else text[: n - 3] + "..."
