"""What goes wrong in low-bit PTQ, measured: calibration draws, and the first-order term.

Two measurements that the "what goes wrong" notebook (09) needs and the package otherwise
does not offer as such:

* :func:`calibration_draws`: the same model and PTQ setting calibrated on several random sets of
  training images. Min-max ranges are set by the few largest values a draw happens to contain,
  so at 3 bits the accuracy moves by many points from draw to draw; clipping observers move less.
* :func:`first_order_rows`: the loss increase of round-to-nearest weights split into what the
  second-order model predicts (``1/2 sum sigma_i^2 H_ii``) and the first-order term ``g'dW`` it
  assumes away. At a minimum the gradient is about zero; for an undertrained model it is not,
  and the first-order term can dominate the damage.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from . import data as wdata
from .stats import mean_interval


def calibration_draws(models: Mapping[str, Any], configs: Sequence[Any], bundle: wdata.DataBundle, *,
                      n_calib: int, draws: int, n_eval: int | None = None) -> list[dict[str, Any]]:
    """One row per model, PTQ config and calibration draw: the test accuracy after calibrating on
    draw ``d`` (``n_calib`` training images chosen by a generator seeded with ``d``; the same
    images for every model). ``models`` maps a label to a module (or to an object with ``.model``)."""
    from .batch.members import calibration_images
    from .ptq import sweep

    evals = list(wdata.batches(bundle.test, bundle.info, 500, limit=n_eval))
    rows = []
    for d in range(int(draws)):
        calib = calibration_images(bundle, n_calib, d)
        for label, m in models.items():
            net = getattr(m, "model", m)
            for r in sweep([(label, net)], configs, calib, evals, include_fp=False, progress=False):
                rows.append({"label": label, "config": r["config"], "observer": r["observer"],
                             "ptq_method": r["ptq_method"], "draw": d, "accuracy": r["accuracy"], "loss": r["loss"]})
    return rows


def draw_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model, config and observer: mean, standard deviation, min and max over the draws."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["config"], r["observer"], r.get("ptq_method"))].append(float(r["accuracy"]))
    out = []
    for (label, config, observer, method), accs in groups.items():
        mi = mean_interval(accs)
        out.append({"label": label, "config": config, "observer": observer, "ptq_method": method, "draws": len(accs),
                    "mean": mi["mean"], "std": mi["std"], "min": min(accs), "max": max(accs)})
    return out


def first_order_rows(models: Mapping[str, Any], bundle: wdata.DataBundle, *, w_bits: int = 4, n_hessian: int = 128,
                     probes: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """Per model, on ``n_hessian`` training images: the FP test accuracy (percent), the gradient
    norm, the second-order prediction of the round-to-nearest weight-quantization loss increase,
    the first-order term ``g'dW`` and the measured increase."""
    import torch

    from .flatness import weight_quant_prediction
    from .train import evaluate

    batch = next(iter(wdata.batches(bundle.train, bundle.info, int(n_hessian))))
    rows = []
    for label, m in models.items():
        net = getattr(m, "model", m).eval()
        fp = evaluate(net, wdata.batches(bundle.test, bundle.info, 500))
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()
        grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters() if p.grad is not None))
        net.zero_grad(set_to_none=True)
        q = weight_quant_prediction(net, batch, w_bits=w_bits, max_probes=int(probes), min_probes=min(5, int(probes)),
                                    tol=0.1, deflate=min(10, int(probes)),
                                    generator=torch.Generator().manual_seed(seed))
        rows.append({"label": label, "fp_accuracy": fp["accuracy"], "grad_norm": grad_norm, "w_bits": w_bits,
                     "predicted": q.predicted, "predicted_stderr": q.predicted_stderr, "first_order": q.first_order,
                     "measured": q.measured_rtn,
                     "first_order_share": q.first_order / q.measured_rtn if q.measured_rtn else math.nan})
    return rows
