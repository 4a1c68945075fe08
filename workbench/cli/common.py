"""What every command module shares: the command registry, printing results, and reading
``key=value`` flags.

Nothing here imports torch, plotly or papermill, so ``workbench --help`` stays fast: command
modules import their compute code inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..registry import Registry

#: ``add_json(parser)``: give a (sub)command the ``--json`` flag.
AddJson = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """One ``workbench`` subcommand: how its arguments are declared and what runs it."""

    add_parser: Callable[[Any, AddJson], None]
    run: Callable[[argparse.Namespace], int]


#: Every subcommand, in the order ``workbench --help`` lists them (their modules register them
#: when :mod:`workbench.cli` imports them).
COMMANDS: Registry[Command] = Registry("command")


def register(name: str, add_parser: Callable[[Any, AddJson], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    COMMANDS.register(name, Command(add_parser, run))


def add_json(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def emit(obj: Any, as_json: bool, text: str | None = None) -> None:
    """Print ``obj`` as JSON (stdout) or ``text`` for people."""
    from ..runinfo import json_default

    if as_json or text is None:
        print(json.dumps(obj, indent=2, default=json_default))
    else:
        print(text)


def parse_kv(items: Sequence[str] | None, flag: str = "-p") -> dict[str, Any]:
    """``key=value`` pairs, the one reader of every such flag (``-p``, ``--method-arg``,
    ``--train-arg``, ``--model-arg``). Hyphens in keys become underscores.

    A value is read as JSON where it is JSON (``3``, ``1e-3``, ``true``, ``[1, 2]``), else as YAML
    (``[plain, dnq]``, ``{depth: 4}``, ``True``); ``None``, ``null`` and ``~`` are null; anything else, and an
    empty value, is the string as typed.

    Raises:
        ConfigError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _value(v)
    return out


def _value(text: str) -> Any:
    stripped = text.strip()
    if stripped in ("None", "null", "~"):
        return None
    try:  # JSON first: YAML 1.1 would read 1e-3 as a string
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    import yaml

    try:
        val = yaml.safe_load(stripped)
    except yaml.YAMLError:
        return text
    return text if val is None else val  # an empty value is the empty string, not null


def parse_val_size(text: str | int | float) -> int | float:
    """``--val-size``: ``200`` (a count) or ``0.1`` (a fraction); :func:`workbench.data.val_count`
    checks the range against the training set size.

    A decimal such as ``2.0`` or ``1.5`` is refused: on the command line it is most likely a
    mistyped fraction, and a count is written without a decimal point.

    Raises:
        ConfigError: not a number, or a decimal >= 1.
    """
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"--val-size {text!r} is not a number: give a count of images such as 200 or a "
                          "fraction such as 0.1") from None
    if value >= 1:
        raise ConfigError(f"--val-size {text} is neither a fraction below 1 nor a whole count: give a fraction "
                          f"such as 0.1, or a number of images without a decimal point such as {int(value)}")
    return value
