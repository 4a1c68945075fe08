"""Plotly figures built from the tidy tables the workbench returns.

Every builder takes what a compute module returns (a list of dict rows, a result dataclass or a
mapping of names to results) and gives back a :class:`plotly.graph_objects.Figure`. A pandas
``DataFrame`` is accepted wherever rows are (pandas is not a dependency; it is only recognised).

One look everywhere: the ``workbench`` template (:func:`template`) and one colour per method
name (:func:`method_color`), so ``dnq`` is the same colour in a training curve, a PTQ sweep and a
spectral density. Axis titles carry units; hover text says what a point is.

======================  =========================================  ================================
figure                  input                                      from
======================  =========================================  ================================
training_curves         history rows, or {run: rows/TrainResult}   ``train.fit(...).history``
error_histogram         error samples (+ step or pred_std)         ``errormodel.error_samples``
layer_error_bars        rows: layer, kind, std, pred_std           ``errormodel.measure``
accuracy_vs_bits        rows: method, w_bits, a_bits, accuracy     ``ptq.sweep``
wqe_vs_aqe_plot         rows: bits, quantized, accuracy            ``ptq.wqe_vs_aqe``
eigen_density           DensityResult or {name: DensityResult}     ``flatness.spectral_density``
landscape_1d            Landscape1D or {name: Landscape1D}         ``landscape.landscape_1d/_line``
landscape_2d            Landscape2D                                ``landscape.landscape_2d``
prediction_vs_measured  QuantPrediction(s) or damage_table rows    ``flatness``
======================  =========================================  ================================

:func:`save_figure` writes interactive HTML and static images (PNG/SVG/PDF through kaleido when it
is installed and finds a Chrome/Chromium; otherwise it logs why and writes HTML + JSON instead).

The figures live in one module per subject: :mod:`~workbench.plots.style` (template, colours),
:mod:`~workbench.plots.inputs` (what the builders accept), :mod:`~workbench.plots.training`,
:mod:`~workbench.plots.errors`, :mod:`~workbench.plots.ptq`, :mod:`~workbench.plots.flatness` and
:mod:`~workbench.plots.export` (saving); every public name is importable from here.
"""

from __future__ import annotations

from .errors import (  # noqa: F401
    LAYER_ERROR_COLUMNS,
    error_histogram,
    histogram_density,
    injected_trace,
    layer_error_bars,
    noise_curve,
)
from .export import (  # noqa: F401
    BROWSER_NAMES,
    STATIC_FORMATS,
    save_figure,
    static_image,
)
from .flatness import (  # noqa: F401
    PREDICTION_COLUMNS,
    eigen_density,
    landscape_1d,
    landscape_2d,
    prediction_rows,
    prediction_vs_measured,
)
from .inputs import (  # noqa: F401
    Rows,
    as_list,
    as_rows,
    hover_value,
    num,
)
from .ptq import (  # noqa: F401
    SWEEP_COLUMNS,
    accuracy_vs_bits,
    bits_per_layer,
    cost_figure,
    drop_figure,
    run_label,
    wqe_vs_aqe_plot,
)
from .style import (  # noqa: F401
    DASHES,
    KIND_COLORS,
    METHOD_COLORS,
    MODEL_COLORS,
    OBSERVER_DASH,
    method_color,
    styled,
    template,
)
from .training import (  # noqa: F401
    CURVES,
    HISTORY_COLUMNS,
    curve_trace,
    training_curves,
    training_figure,
)
