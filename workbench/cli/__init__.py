"""The ``workbench`` command line.

Every subcommand maps one-to-one onto a package function; ``--json`` prints
machine-readable results on stdout (progress and logs go to stderr). Errors the workbench
raises on purpose print one clear line and exit with a code per error class.

One module per command group registers its commands in :data:`workbench.cli.common.COMMANDS`
when it is imported below; the commands import their compute code when they run, so
``workbench --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    NotebookError,
    RunDirError,
    TrainingDivergedError,
    WorkbenchError,
)
from . import data, flatness, ptq, run, study, train, zoo  # noqa: F401 - each registers its commands
from .common import COMMANDS, add_json
from .train import EXIT_INTERRUPTED

__all__ = ["EXIT_CODES", "EXIT_INTERRUPTED", "build_parser", "main"]

log = logging.getLogger("workbench")

EXIT_CODES: dict[type, int] = {ConfigError: 2, DataError: 3, ModelError: 4, CheckpointError: 5,
                               RunDirError: 6, TrainingDivergedError: 7, NotebookError: 8}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0] + " See README.md.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS.names():
        COMMANDS.get(name).add_parser(sub, add_json)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS.get(args.command).run(args)
    except WorkbenchError as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        for cls, code in EXIT_CODES.items():
            if isinstance(e, cls):
                return code
        return 1
