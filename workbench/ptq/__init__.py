"""Post-training quantization engine (issue 4): fake-quantized copies, observers, sweeps.

See :mod:`workbench.ptq.engine` for what is quantized and what stays in floating point.

The names below load their module (and torch) on first use, so that importing a light
submodule, such as the ``workbench ptq`` command's parser, does not import the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("SWEEP_COLUMNS", "against_fp", "configs_from_bits", "format_table", "sweep",
                     "sweep_checkpoints", "wqe_vs_aqe"), "analysis"),
    **dict.fromkeys(("FLOAT_OPS", "PTQConfig", "QuantizedModel", "not_applicable", "quantize_model"), "engine"),
    **dict.fromkeys(("Allocation", "activation_sensitivities", "allocate_bits", "layer_sensitivities"), "mixed"),
    **dict.fromkeys(("ActQuantizer", "QuantAttention", "QuantConv", "QuantLinear"), "modules"),
    **dict.fromkeys(("OBSERVERS", "Observer", "make_observer"), "observers"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
