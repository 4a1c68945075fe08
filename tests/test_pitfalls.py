"""The "what goes wrong" measurements: calibration draws are reproducible and differ, their
summary matches a closed form."""

from __future__ import annotations

import statistics

import pytest
import torch

from workbench import data as wdata
from workbench.batch.members import calibration_images
from workbench.pitfalls import draw_summary


def test_calibration_draws_are_fixed_by_their_index_and_differ_between_draws():
    bundle = wdata.load("digits", seed=0, n_calib=0)
    a0, a0_again, a1 = (torch.cat(calibration_images(bundle, 64, d)) for d in (0, 0, 1))
    assert a0.shape[0] == 64 and torch.equal(a0, a0_again)
    assert not torch.equal(a0, a1)
    # training images only: every calibration image is one of the training split's
    train = torch.cat([x for x, _ in wdata.batches(bundle.train, bundle.info, 4096)])
    assert all(bool((train == img).flatten(1).all(1).any()) for img in a1[:8])


def test_draw_summary_is_mean_std_min_max_over_draws():
    accs = [43.6, 63.2, 47.4]
    rows = [{"label": "m", "config": "W3A3", "observer": "minmax", "ptq_method": "rtn", "draw": d, "accuracy": a}
            for d, a in enumerate(accs)]
    rows.append({"label": "m", "config": "W3A3", "observer": "mse", "ptq_method": "rtn", "draw": 0, "accuracy": 77.0})
    out = {r["observer"]: r for r in draw_summary(rows)}
    mm = out["minmax"]
    assert mm["draws"] == 3 and mm["mean"] == pytest.approx(statistics.fmean(accs))
    assert mm["std"] == pytest.approx(statistics.stdev(accs)) and (mm["min"], mm["max"]) == (43.6, 63.2)
    assert out["mse"]["draws"] == 1
