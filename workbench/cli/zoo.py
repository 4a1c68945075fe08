"""``workbench zoo list | info NAME | build NAME...``: the reference model zoo (see :mod:`workbench.zoo`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .. import zoo
from .common import AddJson, register


def add_zoo_parser(sub: Any, add_json: AddJson) -> None:
    p = sub.add_parser("zoo", help="the reference model zoo: trained parents to fine-tune from (--init zoo:NAME)")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    add_json(zsub.add_parser("list", help="the entries, whether each is here, and its accuracy"))
    i = zsub.add_parser("info", help="one entry: the command that made it, metrics, sha256")
    i.add_argument("name")
    add_json(i)
    b = zsub.add_parser("build", help="re-make entries with their recorded commands and publish them")
    b.add_argument("names", nargs="+", metavar="NAME", help="entries to build ('all': every one)")
    b.add_argument("--work", required=True, help="folder for the training runs (one sub-folder per entry)")
    b.add_argument("--dest", default=None, help="zoo folder to publish into (default: the repository's data/zoo)")
    b.add_argument("--overwrite", action="store_true", help="replace published entries")
    add_json(b)


def run_zoo_command(args: Any) -> int:
    if args.zoo_command == "list":
        rows = zoo.list_entries()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                acc = f"{r['test_accuracy']:.2f} %" if r["test_accuracy"] is not None else "not built"
                print(f"{r['name']:<20} {acc:>10}  {r['description']}")
        return 0
    if args.zoo_command == "info":
        rec = zoo.info(args.name)
        print(json.dumps(rec, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in rec.items()))
        return 0
    return _build(args)


def _build(args: Any) -> int:
    from ..runinfo import prepare_run_dir
    from . import main as cli_main

    names = zoo.ZOO.names() if args.names == ["all"] else [zoo.ZOO.get(n).name for n in args.names]
    published = zoo.manifest(args.dest)
    clash = [n for n in names if n in published and not args.overwrite]
    if clash:  # checked before hours of training, not after
        from ..errors import RunDirError

        raise RunDirError(f"zoo entries {clash} exist; pass --overwrite to replace them")
    work = Path(args.work).expanduser().resolve()
    records = {}
    for name in names:
        recipe = zoo.ZOO.get(name)
        run_dir = prepare_run_dir(work / name)
        t0 = time.perf_counter()
        rc = cli_main(["train", *recipe.train_args, "--out", str(run_dir)])
        if rc != 0:
            return rc
        rec = zoo.publish(name, run_dir, folder=args.dest, overwrite=args.overwrite)
        rec["build_seconds"] = round(time.perf_counter() - t0, 1)
        records[name] = rec
        if not args.json:
            print(f"published {name}: {rec['metrics'].get('test_accuracy', float('nan')):.2f} % "
                  f"in {rec['build_seconds']:.0f} s, sha256 {rec['sha256'][:16]}...")
    if args.json:
        print(json.dumps(records, indent=2))
    return 0


register("zoo", add_zoo_parser, run_zoo_command)
