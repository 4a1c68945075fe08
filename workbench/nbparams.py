"""Notebook parameters checked before a batch starts: paths made absolute, values validated.

``workbench run``, ``sweep`` and ``study`` execute notebooks with papermill in the notebooks'
folder, so a relative path handed to a notebook would be read from there, not from where the
user typed it. :func:`absolute_paths` resolves every path parameter (a name ending in ``_dir``,
``_path`` or ``_file``, the path in ``data="imagefolder:PATH"`` and a checkpoint ``init``)
against the caller's working directory first.

:func:`check_values` builds what the package would build from the parameters (the training
recipe, each method's config, the bit widths, the registry names) with the package's own
checks, so ``-p epochs=-1`` is refused with the package's message before any notebook runs
instead of failing in every notebook. A parameter the package has no check for passes through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, WorkbenchError

#: A notebook parameter with one of these name endings holds a path.
PATH_SUFFIXES = ("_dir", "_path", "_file")
IMAGEFOLDER = "imagefolder:"  # the dataset name that carries a path
#: Counts of images or iterations that must be >= 0 (0 means "all" or "none").
_NON_NEGATIVE = ("limit_train", "limit_test", "n_calib")
#: Counts that must be >= 1.
_POSITIVE = ("n_hessian", "probes", "eig_iters")


def is_path_parameter(name: str) -> bool:
    return name.endswith(PATH_SUFFIXES)


def absolute_paths(params: Mapping[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """``params`` with each relative path parameter resolved against ``cwd`` (default: the
    current working directory). ``None`` and absolute paths are left as they are; ``~`` expands."""
    base = Path(cwd) if cwd is not None else Path(os.getcwd())

    def absolute(value: str | os.PathLike) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    out = dict(params)
    for name, value in params.items():
        if is_path_parameter(name) and isinstance(value, (str, os.PathLike)) and str(value):
            out[name] = absolute(value)
        elif name == "data" and isinstance(value, str) and value.startswith(IMAGEFOLDER):
            out[name] = IMAGEFOLDER + absolute(value[len(IMAGEFOLDER):])
        elif name == "init" and isinstance(value, (str, os.PathLike)) and str(value) \
                and not str(value).startswith(("zoo:", "timm:")):  # a checkpoint path; zoo:/timm:NAME are names
            out[name] = absolute(value)
    return out


def literal_defaults(declared: Mapping[str, Any]) -> dict[str, Any]:
    """A notebook's declared defaults (source text, as papermill reports them) as values; a
    default that is not a literal is left out."""
    import ast

    out = {}
    for name, text in declared.items():
        try:
            out[name] = ast.literal_eval(text) if isinstance(text, str) else text
        except (ValueError, SyntaxError):
            continue
    return out


def check_notebook(notebook: str, declared: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """:func:`check_values` of what one notebook will run with: its defaults, then ``given``
    (only the names it declares); the error names the notebook."""
    merged = {**literal_defaults(declared), **{k: v for k, v in given.items() if k in declared}}
    try:
        check_values(merged)
    except ConfigError as e:
        raise ConfigError(f"{notebook}: {e}") from None


def check_values(params: Mapping[str, Any]) -> None:
    """Refuse parameter values the package would refuse, naming the parameter.

    Raises:
        ConfigError: one line: ``parameter NAME=VALUE: <the package's message>``.
    """
    for name, check in _CHECKS:
        if any(k in params for k in name):
            try:
                check(params)
            except WorkbenchError as e:
                shown = ", ".join(f"{k}={params[k]!r}" for k in name if k in params)
                raise ConfigError(f"parameter {shown}: {e}") from None


def _train(p: Mapping[str, Any]) -> None:
    from .train import TrainConfig

    fields = {k: p[k] for k in ("batch_size", "seed") if p.get(k) is not None}
    extra = p.get("train_args") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError("train_args must be a mapping of TrainConfig fields, e.g. {'lr': 0.001}")
    for k, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{k} must be a whole number, got {v!r}")
    epochs = p.get("epochs")
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)):
            raise ConfigError(f"epochs must be a number, got {epochs!r}")
        if epochs == 0 and not p.get("init"):
            raise ConfigError("epochs=0 trains nothing: it needs a trained starting point (init='zoo:NAME', a "
                              "checkpoint path or timm:NAME)")
        if epochs != 0:  # 0 with init: quantize the parent without training
            fields["epochs"] = epochs
    TrainConfig.from_dict({**fields, **extra})


def _init(p: Mapping[str, Any]) -> None:
    from . import zoo

    init = p.get("init")
    if not init:
        return
    text = str(init)
    if text.startswith(zoo.PREFIX):
        zoo.path(text[len(zoo.PREFIX):])  # unknown name, not built here, or a damaged file
    elif text.startswith(zoo.TIMM_PREFIX):
        from .models import pretrained_input

        pretrained_input(text)  # not a timm model with pretrained weights (the download is checked when loaded)
    elif not Path(text).is_file():
        raise ConfigError(f"no checkpoint at {text}: give a model.pt path or zoo:NAME (`workbench zoo list`)")


def _device(p: Mapping[str, Any]) -> None:
    from .runinfo import resolve_device

    if p.get("device") is not None:
        resolve_device(p["device"])


def _methods(p: Mapping[str, Any]) -> None:
    from .precondition import MethodConfig

    names = p.get("methods") if p.get("methods") is not None else [p.get("method", "plain")]
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"methods must be a list of method names, got {names!r}")
    extra = p.get("method_args") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError("method_args must be a mapping of MethodConfig fields, e.g. {'rho': 0.1}")
    common = {k: p[k] for k in ("w_bits", "a_bits", "noise_mult") if k in p}
    if p.get("noise_bits") is not None:  # the noise target, where a notebook separates it from PTQ's bits
        from .quant import parse_bits_pair

        common["w_bits"], common["a_bits"] = parse_bits_pair(str(p["noise_bits"]))
    for name in names:
        MethodConfig.from_dict({**common, **extra, "method": name})


def _bits(p: Mapping[str, Any]) -> None:
    from .quant import parse_bits_pair

    bits = p["bits"]
    for b in bits if isinstance(bits, (list, tuple)) else [bits]:
        parse_bits_pair(str(b))


def _noise_bits(p: Mapping[str, Any]) -> None:
    from .quant import parse_bits_pair

    if p.get("noise_bits") is not None:
        parse_bits_pair(str(p["noise_bits"]))


def _registry(key: str, registry_of: str, passthrough: str | None = None):
    def check(p: Mapping[str, Any]) -> None:
        value = p.get(key)
        if value is None:
            return
        registry = _registries()[registry_of]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if passthrough is None or not str(v).startswith(passthrough):  # imagefolder:PATH, timm:NAME are checked when loaded
                registry.get(str(v))  # raises UnknownNameError, listing the valid names
    return check


def _registries() -> dict[str, Any]:
    from .data import DATASETS
    from .models import MODELS
    from .ptq import OBSERVERS

    return {"data": DATASETS, "model": MODELS, "observer": OBSERVERS}


def _strong_methods(p: Mapping[str, Any]) -> None:
    from .ptq import PTQConfig

    methods = p.get("strong_methods")
    if methods is None:
        return
    if not isinstance(methods, Mapping) or not all(isinstance(v, Mapping) for v in methods.values()):
        raise ConfigError("strong_methods maps a name to PTQConfig fields, e.g. "
                          "{'AdaRound': {'reconstruction': 'adaround'}}")
    for fields in methods.values():
        PTQConfig.from_dict(dict(fields))  # unknown fields or values: the PTQConfig message


def _counts(p: Mapping[str, Any]) -> None:
    for k in _NON_NEGATIVE + _POSITIVE:
        if k not in p or p[k] is None:
            continue
        v, least = p[k], (0 if k in _NON_NEGATIVE else 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ConfigError(f"{k} must be a whole number >= {least}, got {v!r}")


def _val_size(p: Mapping[str, Any]) -> None:
    v = p.get("val_size")
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ConfigError(f"val_size must be 0, a fraction in (0, 1) or a number of images, got {v!r}")


_CHECKS = (
    (("epochs", "batch_size", "seed", "train_args", "init"), _train),
    (("init",), _init),
    (("device",), _device),
    (("method", "methods", "method_args", "w_bits", "a_bits", "noise_bits", "noise_mult"), _methods),
    (("bits",), _bits),
    (("noise_bits",), _noise_bits),
    (("data",), _registry("data", "data", "imagefolder:")),
    (("model",), _registry("model", "model", "timm:")),
    (("observers",), _registry("observers", "observer")),
    (("strong_methods",), _strong_methods),
    (_NON_NEGATIVE + _POSITIVE, _counts),
    (("val_size",), _val_size),
)
