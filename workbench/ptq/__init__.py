"""Post-training quantization engine (issue 4): fake-quantized copies, observers, sweeps.

See :mod:`workbench.ptq.engine` for what is quantized and what stays in floating point.
"""

from .analysis import SWEEP_COLUMNS, configs_from_bits, format_table, sweep, sweep_checkpoints, wqe_vs_aqe
from .engine import FLOAT_OPS, PTQConfig, QuantizedModel, not_applicable, quantize_model
from .mixed import Allocation, activation_sensitivities, allocate_bits, layer_sensitivities
from .modules import ActQuantizer, QuantAttention, QuantConv, QuantLinear
from .observers import OBSERVERS, Observer, make_observer

__all__ = [
    "FLOAT_OPS", "OBSERVERS", "SWEEP_COLUMNS", "configs_from_bits", "format_table", "sweep", "sweep_checkpoints",
    "wqe_vs_aqe", "ActQuantizer", "Observer", "PTQConfig", "QuantAttention", "QuantConv",
    "QuantLinear", "QuantizedModel", "make_observer", "not_applicable", "quantize_model",
    "Allocation", "activation_sensitivities", "allocate_bits", "layer_sensitivities",
]
