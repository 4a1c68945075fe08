"""flatquant workbench: train networks that are flat before they are quantized.

The public API, loaded lazily (``import workbench`` imports no torch, plotly, ipywidgets or
papermill until a name is used)::

    import workbench as wb
    data = wb.load_data("fashion-mnist-mini")
    model, ckpt = wb.load_zoo("vit-micro-mini-s0")
    qm = wb.quantize_model(model, wb.PTQConfig(w_bits=4, a_bits=4), calib_images)
    report = wb.flatness_report(model, batch)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> (module, attribute): what ``workbench.NAME`` gives.
_API: dict[str, tuple[str, str]] = {
    "load_data": (".data", "load"),
    "create_model": (".models", "create"),
    "fit": (".train", "fit"),
    "TrainConfig": (".train", "TrainConfig"),
    "MethodConfig": (".precondition", "MethodConfig"),
    "PTQConfig": (".ptq", "PTQConfig"),
    "quantize_model": (".ptq", "quantize_model"),
    "LossHessian": (".flatness", "LossHessian"),
    "flatness_report": (".flatness", "flatness_report"),
    "WorkbenchError": (".errors", "WorkbenchError"),
    "load_zoo": (".zoo", "load"),
    "zoo_entries": (".zoo", "list_entries"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
