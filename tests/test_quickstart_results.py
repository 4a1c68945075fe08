"""00_quickstart at its defaults, judged by what it saved: the checked cells of nbval only echo
configurations, so they would not notice PTQ falling to chance. Slow: one real run (minutes)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from workbench import runner, zoo

#: points a fine-tune may lose against its parent's full-precision accuracy on the same images
FP_MARGIN = 3.0
#: points a lower bit width may score above a higher one: 5 of the 500 test images. W4A4 flips a
#: few predictions either way (measured: +0.6 over FP32 for one fine-tune); W3A3 loses 5-20 points.
ORDER_SLACK = 1.0


@pytest.mark.slow
def test_quickstart_defaults_fine_tune_a_converged_parent_and_quantize_sensibly(tmp_path: Path) -> None:
    nb = runner.resolve_notebook("00_quickstart")
    defaults = runner.notebook_parameters(nb)
    row = runner.execute_notebook(nb, tmp_path / "executed.ipynb", {"out_dir": str(tmp_path / "res")}, html=False)
    assert row["status"] == "ok", row.get("message")
    rows = json.loads((tmp_path / "res" / "ptq.json").read_text())
    acc = {(r["label"], r["config"], r["observer"]): r["accuracy"] for r in rows}
    fp = {r["label"]: r["accuracy"] for r in rows if r["config"] == "FP32"}
    # the parent is the zoo model the defaults name, converged (>= 83 % on the full test split)
    assert defaults["init"].strip("\"'") == "zoo:vit-micro-mini-s0"
    assert zoo.info("vit-micro-mini-s0")["metrics"]["test_accuracy"] >= 83.0
    for label, value in fp.items():
        assert value >= fp["parent"] - FP_MARGIN, (label, value, fp["parent"])
    # accuracy does not rise as the bits fall, for every model and observer; W4A4 stays far above chance
    order = ["FP32", "W4A4", "W3A3"]
    by_model = defaultdict(dict)
    for (label, config, observer), value in acc.items():
        by_model[(label, observer)][config] = value
    for (label, observer), got in by_model.items():
        got.setdefault("FP32", fp[label])
        for hi, lo in zip(order, order[1:]):
            if hi in got and lo in got:
                assert got[lo] <= got[hi] + ORDER_SLACK, (label, observer, got)
        if "W4A4" in got:
            assert got["W4A4"] > 50.0, (label, observer, got)  # chance is 10 %
    # every arm and seed was paired with plain of the same seed
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    dnq = [r for r in summary if r["arm"] == "dnq" and r["config"] != "FP32"]
    assert dnq and all(r["n_pairs"] == r["n"] >= 2 and r["verdict"] for r in dnq)
