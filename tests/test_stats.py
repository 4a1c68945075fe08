"""Seed statistics against closed forms and tabulated Student-t values."""

from __future__ import annotations

import math

import pytest

from workbench.errors import ConfigError
from workbench.stats import mean_interval, paired_summary, t_quantile


def test_t_quantiles_match_the_printed_table():
    # two-sided 95 % critical values of Student's t (any statistics table)
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


def test_mean_interval_closed_form():
    m = mean_interval([1.0, 2.0, 3.0])
    # mean 2, sample std 1, half-width t(0.975, 2) / sqrt(3); with 2 degrees of freedom the
    # quantile has a closed form: t_p = (2p - 1) / sqrt(2 p (1 - p))
    p = 0.975
    assert (m["n"], m["mean"], m["std"]) == (3, 2.0, 1.0)
    assert m["half_width"] == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)) / math.sqrt(3), rel=1e-9)
    assert m["ci_low"] == pytest.approx(2.0 - m["half_width"]) and m["ci_high"] == pytest.approx(2.0 + m["half_width"])
    one = mean_interval([5.0])
    assert one["n"] == 1 and one["mean"] == 5.0 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    with pytest.raises(ConfigError):
        mean_interval([])


def _rows(arm, accs, config="W4A4"):
    return [{"arm": arm, "seed": s, "config": config, "observer": "minmax", "accuracy": a} for s, a in enumerate(accs)]


def test_pairing_removes_what_the_seed_does_to_both_arms():
    # the seed moves both arms by a lot; dnq is always 1 point above plain of the same seed
    plain = [60.0, 75.0, 68.0]
    rows = _rows("plain", plain) + _rows("dnq", [a + 1.0 for a in plain]) + _rows("sam", [a - 0.5 + (s % 2) for s, a
                                                                                           in enumerate(plain)])
    table = {r["arm"]: r for r in paired_summary(rows)}
    assert "diff_mean" not in table["plain"]
    d = table["dnq"]
    assert d["n_pairs"] == 3 and d["diff_mean"] == pytest.approx(1.0)
    assert d["diff_ci_low"] == pytest.approx(1.0) and d["verdict"] == "better"  # no spread in the differences
    # the unpaired means overlap entirely, the paired difference does not
    assert d["ci_low"] < table["plain"]["mean"] < d["ci_high"]
    # sam: differences -0.5, +0.5, -0.5: the interval straddles 0
    assert table["sam"]["verdict"] == "not distinguishable"
    assert table["sam"]["diff_ci_low"] < 0 < table["sam"]["diff_ci_high"]


def test_pairing_errors_and_single_pairs():
    with pytest.raises(ConfigError, match="two rows"):
        paired_summary(_rows("plain", [1.0]) + _rows("plain", [2.0]))
    with pytest.raises(ConfigError, match="has no 'seed'"):
        paired_summary([{"arm": "plain", "config": "W4A4", "observer": "minmax", "accuracy": 1.0}])
    one = {r["arm"]: r for r in paired_summary(_rows("plain", [50.0]) + _rows("dnq", [52.0]))}
    assert one["dnq"]["verdict"] == "one pair" and one["dnq"]["diff_mean"] == 2.0
