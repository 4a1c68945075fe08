"""``workbench data``, ``workbench models`` and ``workbench notebooks``: what there is to work with."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import AddJson, emit, register


def add_data_parser(sub: Any, add_json: AddJson) -> None:
    d = sub.add_parser("data", help="list datasets, show one, download one")
    dsub = d.add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    dl = dsub.add_parser("list", help="registered datasets")
    add_json(dl)
    for name, hlp in (("info", "load a dataset and show its splits and metadata"),
                      ("download", "download a dataset that needs it (fashion-mnist, cifar10, cifar100)")):
        sp = dsub.add_parser(name, help=hlp)
        sp.add_argument("name")
        sp.add_argument("--data-dir", default=None, help="dataset folder (default: data/ or $WORKBENCH_DATA_DIR)")
        add_json(sp)


def add_models_parser(sub: Any, add_json: AddJson) -> None:
    m = sub.add_parser("models", help="registered models")
    m.add_argument("--details", action="store_true", help="build each model and show parameters and FLOPs")
    add_json(m)


def add_notebooks_parser(sub: Any, add_json: AddJson) -> None:
    nb = sub.add_parser("notebooks", help="copy the notebooks into a folder of yours (e.g. after pip install)")
    nb.add_argument("dest", help="the folder to copy them into (made if missing)")
    nb.add_argument("--overwrite", action="store_true", help="replace notebooks of the same name already there")
    add_json(nb)


def cmd_data(args: argparse.Namespace) -> int:
    from .. import data

    if args.data_cmd == "list":
        rows = [{"name": n, "help": data.DATASETS.help(n)} for n in data.DATASETS.names()]
        rows.append({"name": "imagefolder:PATH", "help": "any folder of class sub-folders"})
        emit(rows, args.json, "\n".join(f"{r['name']:<20} {r['help']}" for r in rows))
    elif args.data_cmd == "info":
        bundle = data.load(args.name, data_dir=args.data_dir)
        s = bundle.summary()
        emit(s, args.json, "\n".join(f"{k:<12} {v}" for k, v in s.items()))
    elif args.data_cmd == "download":
        bundle = data.load(args.name, data_dir=args.data_dir, download=True)
        emit(bundle.summary(), args.json, f"{args.name}: {len(bundle.train)} train / {len(bundle.test)} test images ready")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .. import models

    rows = []
    for n in models.MODELS.names():
        row = {"name": n, "help": models.MODELS.help(n)}
        if args.details:
            row.update(models.model_summary(models.create(n)))
        rows.append(row)
    rows.append({"name": "timm:<name>", "help": "any timm model, e.g. timm:resnet10t"})
    lines = [f"{r['name']:<14} {r['help']}" + (f"  [{r['params']:,} params, {r['flops_per_image'] / 1e6:.1f} MFLOPs]"
             if "params" in r else "") for r in rows]
    emit(rows, args.json, "\n".join(lines))
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    """Copy the notebooks out of the installed package (or the checkout) into a folder of the user's."""
    from ..bundled import copy_notebooks

    written = copy_notebooks(args.dest, overwrite=args.overwrite)
    dest = Path(args.dest).expanduser().resolve()
    emit({"dest": str(dest), "files": [str(p) for p in written]}, args.json,
         f"{len(written)} files copied to {dest}; open them with `jupyter lab {dest}`")
    return 0


register("data", add_data_parser, cmd_data)
register("models", add_models_parser, cmd_models)
register("notebooks", add_notebooks_parser, cmd_notebooks)
