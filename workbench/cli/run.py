"""``workbench run``, ``workbench sweep`` and ``workbench report``: the notebooks in batch."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..batch.sweep import SWEEP_ENGINES
from .common import AddJson, parse_kv, register


def add_run_parser(sub: Any, add_json: AddJson) -> None:
    """``workbench run``."""
    p = sub.add_parser("run", help="execute the notebooks in order (papermill) into a new folder")
    p.add_argument("--profile", default="quick", choices=("quick", "full"),
                   help="quick: the notebooks' tiny CPU defaults; full: the real models and data")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="notebook parameter override, repeatable (e.g. -p epochs=5 -p 'methods=[plain,dnq]')")
    p.add_argument("--notebook", action="append", metavar="NAME", help="run only these notebooks (repeatable)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing notebook")
    p.add_argument("--no-progress", action="store_true")
    add_json(p)


def add_sweep_parser(sub: Any, add_json: AddJson) -> None:
    """``workbench sweep``."""
    p = sub.add_parser("sweep", help="run one notebook over a parameter grid (YAML), N at a time")
    p.add_argument("grid", help="YAML file: notebook, parameters, grid (see notebooks/sweeps/)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--jobs", type=int, default=1,
                   help="notebooks executed at a time: local processes, or the workers of the Dask "
                        "LocalCluster that --engine dask starts when no --address is given")
    p.add_argument("--engine", default="local", choices=SWEEP_ENGINES,
                   help="local: a process pool on this machine; dask: a Dask distributed cluster")
    p.add_argument("--address", default=None, metavar="tcp://HOST:PORT",
                   help="scheduler of a running Dask cluster (`dask scheduler`), with --engine dask; its "
                        "workers must see the notebooks and --out at the same paths")
    p.add_argument("--retries", type=int, default=1,
                   help="dask: run a job again up to N times when its worker dies (default 1)")
    p.add_argument("--no-html", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_json(p)


def add_report_parser(sub: Any, add_json: AddJson) -> None:
    """``workbench report``."""
    p = sub.add_parser("report", help="aggregate a run or sweep folder into report.csv and report.html")
    p.add_argument("folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    add_json(p)


def _finish(result: dict[str, Any], rows_key: str, as_json: bool, what: str) -> int:
    from ..batch.report import format_summary

    rows = result[rows_key]
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"{what}: {len(rows) - len(result['failed'])} of {len(rows)} succeeded in "
              f"{result['seconds']:.0f} s -> {result['out']}")
        print(format_summary(rows))
        if result.get("report"):
            print(f"report: {result['report']['html']}")
    if result["failed"]:
        print(f"{len(result['failed'])} failed; the executed notebooks show the failing cells", file=sys.stderr)
        return 8  # the CLI's exit code for NotebookError
    return 0


def run_run_command(args: Any) -> int:
    """``workbench run``: execute the notebook set, print a summary; exit 8 if any notebook failed."""
    from ..batch.execute import run_notebooks

    result = run_notebooks(args.out, profile=args.profile, params=parse_kv(args.param),
                           notebooks=args.notebook, html=not args.no_html, stop_on_error=args.stop_on_error,
                           progress=not args.no_progress)
    return _finish(result, "notebooks", args.json, "notebooks")


def run_sweep_command(args: Any) -> int:
    """``workbench sweep``: run the grid, print a summary with each failure's cell; exit 8 on failures."""
    from ..batch.sweep import run_sweep

    result = run_sweep(args.grid, args.out, jobs=args.jobs, html=not args.no_html, progress=not args.no_progress,
                       engine=args.engine, address=args.address, retries=args.retries)
    code = _finish(result, "jobs", args.json, "sweep jobs")
    if not args.json:
        for r in result["failed"]:  # lost with a worker: no cell to show, so say what happened
            if r.get("attempts") and r.get("exec_count") is None:
                print(f"  {r['message']}", file=sys.stderr)
    return code


def run_report_command(args: Any) -> int:
    """``workbench report``: write report.csv and report.html into the folder."""
    from ..batch.report import collect_results, make_report

    paths = make_report(args.folder, overwrite=args.overwrite)
    res = collect_results(args.folder)
    if args.json:
        print(json.dumps({"csv": str(paths["csv"]), "html": str(paths["html"]), "rows": len(res["rows"]),
                          "kind": res["kind"]}, indent=2))
    else:
        print(f"{res['kind']} report: {len(res['rows'])} summary rows from {len(res['units'])} "
              f"{'jobs' if res['kind'] == 'sweep' else 'notebooks'}\n  {paths['csv']}\n  {paths['html']}")
    return 0


register("run", add_run_parser, run_run_command)
register("sweep", add_sweep_parser, run_sweep_command)
register("report", add_report_parser, run_report_command)
