"""``workbench study``: the from-scratch study (``run``, ``ptq``, ``report``) and the fine-tune
protocol (``finetune``)."""

from __future__ import annotations

from typing import Any

from .common import AddJson, register

#: The from-scratch study's default PTQ settings (:data:`workbench.batch.scratch_study.DEFAULT_BITS`,
#: which the parser does not import).
DEFAULT_BITS = ("W8A8", "W6A6", "W4A8", "W4A4", "W3A3", "W2A4")


def add_study_parser(sub: Any, add_json: AddJson) -> None:
    """``workbench study run|report``."""
    p = sub.add_parser("study", help="the reproduction study: search, seeded sweep, report (docs/study/*.yaml)")
    ssub = p.add_subparsers(dest="study_command", required=True)
    r = ssub.add_parser("run", help="run a study file: noise search, main sweep, report")
    r.add_argument("study_file")
    r.add_argument("--out", required=True, help="output folder (must be new or empty)")
    r.add_argument("--jobs", type=int, default=1, help="members executed at a time")
    r.add_argument("--dest", help="where the report's tables and figures go (default OUT/report)")
    r.add_argument("--md", help="Markdown file whose study block is replaced (e.g. docs/results.md)")
    r.add_argument("--engine", default="local", choices=("local", "dask"),
                   help="where members run: this machine's process pool or a Dask cluster (see docs/scaling.md)")
    r.add_argument("--address", default=None, metavar="tcp://HOST:PORT", help="scheduler of a running Dask cluster")
    r.add_argument("--retries", type=int, default=1, help="dask: reruns of a member whose worker died")
    r.add_argument("--search-from", metavar="STUDY_DIR",
                   help="reuse the finished noise search of an earlier study folder instead of searching again")
    r.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    r.add_argument("--no-progress", action="store_true")
    add_json(r)
    a = ssub.add_parser("ptq", help="quantize a finished study's members with more settings (no retraining)")
    a.add_argument("folder")
    a.add_argument("--observers", default="mse", help="comma-separated observers (default mse)")
    a.add_argument("--bits", default=",".join(DEFAULT_BITS), help="comma-separated WbAb settings")
    a.add_argument("--no-attn", action="store_true", help="also leave the attention matmuls in float")
    a.add_argument("--jobs", type=int, default=1)
    a.add_argument("--tag", default=None, help="name of the added tables (default: the observers)")
    add_json(a)
    f = ssub.add_parser("finetune", help="the fine-tune protocol: trained parents, paired arms, PTQ settings, "
                                         "intervals (docs/study/finetune/*.yaml); resumable")
    f.add_argument("protocol", help="protocol file (YAML), e.g. docs/study/finetune/quick.yaml")
    f.add_argument("--out", required=True, help="protocol folder: finished members in it are kept, the rest run")
    f.add_argument("--jobs", type=int, default=1, help="members at a time (one CPU thread each)")
    f.add_argument("--dest", help="where the report's tables and figures go (default OUT/report)")
    f.add_argument("--md", help="Markdown file whose finetune block is replaced (e.g. docs/results.md)")
    f.add_argument("--report-only", action="store_true", help="only rewrite the report from OUT's members")
    f.add_argument("--no-progress", action="store_true")
    add_json(f)
    q = ssub.add_parser("report", help="(re)write a study folder's tables, figures and Markdown")
    q.add_argument("folder")
    q.add_argument("--dest")
    q.add_argument("--md")
    add_json(q)


def run_study_command(args: Any) -> int:
    """``workbench study``: exit 8 if any member failed (the report still lists it)."""
    import json

    from ..batch.scratch_report import write_report
    from ..batch.scratch_study import add_ptq, run_study

    if args.study_command == "run":
        res = run_study(args.study_file, args.out, jobs=args.jobs, dest=args.dest, md=args.md,
                        search_from=args.search_from, html=not args.no_html, progress=not args.no_progress,
                        engine=args.engine, address=args.address, retries=args.retries)
        failed = len(res["main"]["failed"]) + len((res.get("search") or {}).get("failed", []))
        if args.json:
            print(json.dumps({"out": res["out"], "selected": res["selected"], "report": res["report"],
                              "failed": failed}, indent=2, default=str))
        else:
            print(f"study: {len(res['main']['jobs'])} members in {res['main']['seconds']:.0f} s -> {res['out']}")
            if res["selected"]:
                print(f"selected on the validation split: {res['selected']}")
            print(f"report: {res['report']['results_md']}")
        return 8 if failed else 0
    if args.study_command == "finetune":
        return _finetune_command(args)
    if args.study_command == "ptq":
        rows = add_ptq(args.folder, bits=args.bits.split(","), observers=args.observers.split(","),
                       attention=[True, False] if args.no_attn else [True], jobs=args.jobs, tag=args.tag)
        print(json.dumps(rows, indent=2) if args.json else f"added PTQ settings to {len(rows)} members; "
              f"rewrite the report with `workbench study report {args.folder}`")
        return 0
    paths = write_report(args.folder, dest=args.dest, md=args.md)
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    else:
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _finetune_command(args: Any) -> int:
    """``workbench study finetune``: exit 8 if a member failed (the report lists it)."""
    import json
    import sys

    from ..batch.finetune_report import write_report
    from ..batch.finetune_study import report_folder_note, run_protocol
    from ..batch.protocol import Protocol

    protocol = Protocol.from_file(args.protocol)
    failed: list = []
    if args.report_only:
        note = report_folder_note(protocol, args.out)
        if note:
            print(note, file=sys.stderr)
    else:
        res = run_protocol(protocol, args.out, jobs=args.jobs, progress=not args.no_progress)
        failed = res["failed"]
        if res["search"].get("chosen"):
            print(f"search (validation split): {res['search']['chosen']}")
    paths = write_report(args.out, dest=args.dest, md=args.md)
    if args.json:
        print(json.dumps({"out": str(args.out), "failed": failed, **{k: str(v) for k, v in paths.items()}},
                         indent=2, default=str))
    else:
        print(f"report: {paths['report']}" + (f" ({len(failed)} member(s) failed)" if failed else ""))
    return 8 if failed else 0


register("study", add_study_parser, run_study_command)
