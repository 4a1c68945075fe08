"""The fine-tune protocol: intervals that cover, pairing by replicate, the search's choice, rank
correlations per measure, failures kept, and one real member resumed setting by setting."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from workbench import stats
from workbench.batch import finetune_report as fr
from workbench.batch.finetune_study import choose, collect
from workbench.batch.members import run_member
from workbench.batch.protocol import Protocol, PTQSetting, Replicate, member_id
from workbench.errors import ConfigError
from workbench.runinfo import write_csv, write_json


def _protocol(**over) -> Protocol:
    d = {"name": "t", "epochs": 1, "val_size": 200,
         "families": {"fam": {"parents": ["zoo:vit-micro-mini-s0", "zoo:vit-micro-mini-s1", "zoo:vit-micro-mini-s2"],
                              "seeds": [0]}},
         "arms": {"plain": {"method": "plain"}, "dnq": {"method": "dnq", "w_bits": 4, "a_bits": 4,
                                                        "noise_mult": "search"}},
         "search": {"arm": "dnq", "values": [0.5, 1.0, 2.0], "replicates": 3, "bits": "W4A4", "observer": "mse",
                    "fp_tolerance": 0.5},
         "ptq": {"bits": ["W4A4"], "observers": ["mse"], "n_calib": 32}}
    d.update(over)
    return Protocol.from_dict(d)


# ----------------------------------------------------------------------------- intervals


@pytest.mark.parametrize("n, interval, lo, hi", [(6, "t", 0.92, 0.98), (30, "bootstrap", 0.89, 0.98),
                                                  (6, "bootstrap", 0.75, 0.90)])
def test_intervals_cover_a_known_effect_at_about_the_nominal_rate(n, interval, lo, hi):
    # 400 synthetic studies of n paired differences around a true effect of +1.5 points with a
    # spread of 2: the 95 % interval must contain 1.5 in about 95 % of them. The percentile
    # bootstrap is narrow at small n (about 84 % coverage at n = 6, the last case), which is why
    # reports lead with the t interval.
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(400):
        xs = 1.5 + 2.0 * rng.standard_normal(n)
        ci = stats.INTERVALS[interval](xs.tolist(), 0.95, **({"seed": i, "n_boot": 2000} if interval == "bootstrap"
                                                             else {}))
        hits += ci["ci_low"] <= 1.5 <= ci["ci_high"]
    assert lo <= hits / 400 <= hi, hits / 400


def test_bootstrap_interval_is_reproducible_and_checks_its_input():
    xs = [0.3, -1.2, 2.5, 0.8, 1.1, -0.4]
    a, b = stats.bootstrap_interval(xs, seed=3), stats.bootstrap_interval(xs, seed=3)
    assert a == b
    assert a["mean"] == pytest.approx(sum(xs) / len(xs)) and a["ci_low"] < a["mean"] < a["ci_high"]
    with pytest.raises(ConfigError, match="n_boot"):
        stats.bootstrap_interval(xs, n_boot=10)
    with pytest.raises(ConfigError, match="unknown interval"):
        stats.paired_summary([], interval="jackknife")


# ----------------------------------------------------------------------------- pairing


def _ptq_rows(effects: dict[str, float], replicate_shift: dict[str, float], setting: str = "W4A4/mse",
              draws: int = 3) -> list[dict]:
    rows = []
    for arm, eff in effects.items():
        for rep, shift in replicate_shift.items():
            for d in range(draws):
                # draw d moves every arm of the replicate alike (the same calibration images)
                rows.append({"family": "fam", "epochs": 1.0, "replicate": rep, "parent": rep[:-3], "seed": 0,
                             "arm": arm, "setting": setting, "bits": setting.split("/")[0], "column": "mse",
                             "draw": d, "accuracy": 70.0 + shift + eff + (d - 1) * 0.7, "loss": 1.0})
    return rows


def test_pairing_matches_arms_by_replicate_not_by_position():
    shifts = {"p0-s0": 0.0, "p1-s0": 9.0, "p2-s0": -6.0, "p0-s1": 3.0, "p1-s1": -2.0}
    rows = _ptq_rows({"plain": 0.0, "dnq": 1.25}, shifts)
    rows = rows[:15] + list(reversed(rows[15:]))  # the dnq rows in another order than plain's
    random.Random(0).shuffle(rows)
    table = {r["arm"]: r for r in fr.paired_table(rows)}
    d = table["dnq"]
    assert d["n_pairs"] == 5 and d["draws"] == 3
    assert d["diff_mean"] == pytest.approx(1.25) and d["diff_std"] == pytest.approx(0.0, abs=1e-12)
    assert d["verdict"] == "better"
    # unpaired, the replicate spread (std 5.7) would swamp the effect
    assert table["plain"]["std"] > 5


def test_a_replicate_missing_from_the_control_is_left_out_of_the_pairs():
    rows = _ptq_rows({"plain": 0.0, "dnq": 2.0}, {"a": 0.0, "b": 5.0, "c": -3.0})
    rows = [r for r in rows if not (r["arm"] == "plain" and r["replicate"] == "c")]
    d = {r["arm"]: r for r in fr.paired_table(rows)}["dnq"]
    assert d["n_pairs"] == 2 and d["diff_mean"] == pytest.approx(2.0)


def test_calibration_spread_is_reported_apart_from_the_replicate_spread():
    rows = _ptq_rows({"plain": 0.0}, {"a": 0.0, "b": 4.0, "c": -4.0})
    (r,) = fr.calibration_spread(rows)
    assert r["calibration_std"] == pytest.approx(0.7)  # draws at -0.7, 0, +0.7
    assert r["replicate_std"] == pytest.approx(4.0)


def test_not_applicable_rows_are_never_averaged_as_zero():
    rows = _ptq_rows({"plain": 0.0, "dnq": 1.0}, {"a": 0.0, "b": 1.0}, draws=1)
    rows.append({**rows[-1], "setting": "W4A4/repq", "column": "repq", "accuracy": math.nan, "note": "not a ViT"})
    settings = {r["setting"] for r in fr.paired_table(rows)}
    assert settings == {"W4A4/mse"}


def test_without_a_search_the_first_arm_after_the_control_is_compared_head_to_head():
    rows = _ptq_rows({"plain": 0.0, "dnq": 1.0, "wnoise": 0.25, "anoise": 1.5}, {"a": 0.0, "b": 4.0, "c": -3.0})
    arms = {"plain": {"method": "plain"}, "dnq": {"method": "dnq", "noise_mult": 1.0},
            "wnoise": {"method": "wnoise", "noise_mult": 1.0}, "anoise": {"method": "anoise", "noise_mult": 1.0}}
    h2h = fr.head_to_head(rows, {"arms": arms})
    assert {r["arm"] for r in h2h} == {"dnq"}
    diffs = {r["versus"]: r["diff_mean"] for r in h2h}
    assert diffs == {"wnoise": pytest.approx(0.75), "anoise": pytest.approx(-0.5)}
    # a searched arm still takes precedence over the order of the arms
    searched = fr.head_to_head(rows, {"arms": arms, "search": {"arm": "anoise"}})
    assert {r["arm"] for r in searched} == {"anoise"}
    assert {r["versus"]: r["diff_mean"] for r in searched}["dnq"] == pytest.approx(0.5)


def test_compute_is_split_by_part_and_curvature_counted_once_per_member():
    members = [{"family": f, "replicate": r, "arm": a, "epochs": 1.0, "status": st, "train_seconds": t}
               for f, r, a, st, t in [("vit", "r0", "plain", "done", 40.0), ("vit", "r0", "dnq", "done", 50.0),
                                      ("cnn", "r0", "plain", "done", 10.0), ("cnn", "r0", "dnq", "failed", 99.0)]]
    ptq = [{"family": "vit", "ptq_method": m, "calib_time_s": c, "eval_time_s": e}
           for m, c, e in [("rtn", 1.0, 3.0), ("rtn", 0.5, 3.5), ("rtn+bc", 5.0, 3.0), ("qdrop", 50.0, 4.0),
                           ("", None, None)]]  # the FP row: no PTQ method, no time
    ptq.append({"family": "cnn", "ptq_method": "adaround", "calib_time_s": 9.0, "eval_time_s": 2.0})
    # one report per member, its seconds repeated on the rows of both weight bit widths
    curvature = [{"family": "vit", "replicate": "r0", "arm": a, "epochs": 1.0, "w_bits": b, "seconds": sec}
                 for a, sec in (("plain", 100.0), ("dnq", 120.0)) for b in (4, 3)]
    rows = fr.compute_by_part({"members": members, "ptq": ptq, "curvature": curvature})
    got = {(r["family"], r["part"]): r["seconds"] for r in rows}
    assert got == {("cnn", "fine-tuning"): 10.0, ("cnn", "AdaRound"): 11.0,
                   ("vit", "fine-tuning"): 90.0, ("vit", "round-to-nearest PTQ"): 8.0, ("vit", "bias correction"): 8.0,
                   ("vit", "BRECQ+QDrop"): 54.0, ("vit", "curvature"): 220.0,
                   ("all", "fine-tuning"): 100.0, ("all", "round-to-nearest PTQ"): 8.0, ("all", "bias correction"): 8.0,
                   ("all", "AdaRound"): 11.0, ("all", "BRECQ+QDrop"): 54.0, ("all", "curvature"): 220.0}
    # in the order a member works: fine-tune, PTQ from cheap to learned, curvature
    assert [r["part"] for r in rows if r["family"] == "all"] == [
        "fine-tuning", "round-to-nearest PTQ", "bias correction", "AdaRound", "BRECQ+QDrop", "curvature"]


# ----------------------------------------------------------------------------- rank correlations


def test_each_curvature_measure_gets_its_own_rank_correlation():
    # five models, measured damage in increasing order; each measure orders them differently:
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - sum d^2 / 20
    measured = [0.1, 0.2, 0.3, 0.4, 0.5]
    measures = {"trace": [10, 20, 30, 40, 50],  # same order: 1
                "top_eigenvalue": [5, 4, 3, 2, 1],  # reversed: -1
                "sigma_trace": [2, 1, 3, 4, 5],  # one swap: sum d^2 = 2 -> 0.9
                "predicted_increase": [1, 3, 2, 5, 4]}  # two swaps: sum d^2 = 4 -> 0.8
    expected = {"trace": 1.0, "top_eigenvalue": -1.0, "sigma_trace": 0.9, "predicted_increase": 0.8}
    curv, ptq = [], []
    for i in range(5):
        base = {"family": "fam", "epochs": 1.0, "replicate": f"r{i}", "arm": "plain"}
        curv.append({**base, "w_bits": 4, **{m: float(v[i]) for m, v in measures.items()},
                     "measured_increase": measured[i], "first_order": 0.0})
        ptq += [{**base, "setting": "FP32", "bits": "FP32", "column": "fp", "accuracy": 80.0, "loss": 0.5},
                # accuracy lost at W4A4 in the reverse order of the measured loss increase
                {**base, "setting": "W4A4/mse", "bits": "W4A4", "column": "mse", "accuracy": 80.0 - (5 - i),
                 "loss": 0.6}]
    _, rho = fr.curvature_summary(curv, fr.draw_means(ptq))
    got = {r["measure"]: r for r in rho if r["damage"] == "measured_increase"}
    for m, value in expected.items():
        assert got[m]["rho"] == pytest.approx(value), m
        assert got[m]["n"] == 5
    drop = {r["measure"]: r["rho"] for r in rho if r["damage"] != "measured_increase"}
    assert drop["trace"] == pytest.approx(-1.0) and drop["top_eigenvalue"] == pytest.approx(1.0)


def test_rank_correlation_is_refused_below_five_models_and_has_an_interval():
    few = stats.spearman_interval([1, 2, 3, 4], [1, 2, 3, 4])
    assert math.isnan(few["rho"]) and "below 5" in few["note"]
    r = stats.spearman_interval([1, 2, 3, 4, 5, 6, 7], [2, 1, 4, 3, 6, 5, 7])
    # Fisher z with the rank-correlation standard error sqrt(1.06 / (n - 3))
    z, half = math.atanh(r["rho"]), 1.959964 * math.sqrt(1.06 / 4)
    assert r["ci_low"] == pytest.approx(math.tanh(z - half), abs=1e-6)
    assert r["ci_high"] == pytest.approx(math.tanh(z + half), abs=1e-6)


# ----------------------------------------------------------------------------- the search


def _fake_member(out: Path, p: Protocol, rep: Replicate, fields: dict, val_fp: float, val_q: float) -> None:
    folder = out / "members" / member_id(rep, fields, p.epochs[0])
    write_json(folder / "member.json", {"val_accuracy": val_fp, "test_accuracy": 0.0, "test_loss": 0.0})
    write_csv(folder / "ptq.csv", [{"setting": "W4A4/mse", "bits": "W4A4", "column": "mse", "draw": 0,
                                    "split": "val", "accuracy": val_q, "loss": 0.0}])


def test_search_chooses_by_its_stated_criterion_over_several_values(tmp_path: Path):
    p = _protocol()
    reps = p.search_replicates()
    assert len(reps) == 3
    # per value: (FP val accuracies, quantized val accuracies) over the 3 replicates
    plain = ([85.0, 86.0, 87.0], [80.0, 81.0, 82.0])  # FP mean 86.0
    cand = {0.5: ([85.5, 86.0, 86.5], [81.0, 81.0, 82.0]),  # FP 86.0, q 81.33: eligible
            1.0: ([85.0, 85.8, 86.2], [82.0, 82.5, 82.0]),  # FP 85.67 (>= 85.5), q 82.17: eligible, best
            2.0: ([84.0, 85.0, 86.0], [84.0, 84.0, 84.0])}  # FP 85.0 < 85.5: not eligible, though best quantized
    for i, rep in enumerate(reps):
        _fake_member(tmp_path, p, rep, p.arm_config("plain"), plain[0][i], plain[1][i])
        for v, (fp, q) in cand.items():
            _fake_member(tmp_path, p, rep, {**p.arms["dnq"], "noise_mult": v}, fp[i], q[i])
    res = choose(p, tmp_path)
    by = {c["value"]: c for c in res["candidates"]}
    assert [by[v]["eligible"] for v in (0.5, 1.0, 2.0)] == [True, True, False]
    assert res["chosen"] == {"noise_mult": 1.0}
    assert by[1.0]["val_W4A4/mse"] == pytest.approx(82.1666667)
    assert json.loads((tmp_path / "search.json").read_text())["chosen"] == {"noise_mult": 1.0}
    # the main arm then trains with the chosen value, in the folder of that search candidate
    assert p.arm_config("dnq", res["chosen"])["noise_mult"] == 1.0
    assert member_id(reps[0], p.arm_config("dnq", res["chosen"]), 1.0) == \
        member_id(reps[0], {**p.arms["dnq"], "noise_mult": 1.0}, 1.0)


def test_search_with_a_missing_replicate_chooses_nothing_it_cannot_back(tmp_path: Path):
    p = _protocol()
    reps = p.search_replicates()
    for rep in reps:
        _fake_member(tmp_path, p, rep, p.arm_config("plain"), 86.0, 80.0)
    for rep in reps[:2]:  # the third replicate of every candidate failed
        for v in (0.5, 1.0, 2.0):
            _fake_member(tmp_path, p, rep, {**p.arms["dnq"], "noise_mult": v}, 86.0, 85.0)
    res = choose(p, tmp_path)
    assert res["chosen"] is None and not any(c["eligible"] for c in res["candidates"])


# ----------------------------------------------------------------------------- the protocol file


def test_protocol_errors_say_what_is_wrong(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown protocol key"):
        _protocol(seedz=[1])
    with pytest.raises(ConfigError, match="two values"):
        _protocol(search={"arm": "dnq", "values": [1.0]})
    with pytest.raises(ConfigError, match="control arm"):
        _protocol(arms={"dnq": {"method": "dnq"}}, search=None)
    with pytest.raises(ConfigError, match="no search"):
        _protocol(search=None)
    with pytest.raises(ConfigError, match="unknown field"):
        _protocol(ptq={"strong": {"bc": {"bias_corection": True}}})
    with pytest.raises(ConfigError, match="no protocol file"):
        Protocol.from_file(tmp_path / "nope.yaml")
    # the shipped protocols parse
    shipped = sorted((Path(__file__).resolve().parents[1] / "docs" / "study" / "finetune").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"quick", "main", "full"}
    for path in shipped:
        Protocol.from_file(path)


def test_extra_seeds_run_only_their_arms_and_are_paired_with_their_control(tmp_path: Path):
    fams = {"f": {"parents": ["zoo:a", "zoo:b"], "seeds": [0, 1], "extra": {"seeds": [2], "arms": ["plain", "dnq"]}}}
    arms = {"plain": {"method": "plain"}, "dnq": {"method": "dnq"}, "sam": {"method": "sam"}}
    p = _protocol(families=fams, arms=arms, search=None)
    reps = p.replicates()
    assert [(r.parent, r.seed) for r in reps] == [("zoo:a", 0), ("zoo:a", 1), ("zoo:b", 0), ("zoo:b", 1),
                                                  ("zoo:a", 2), ("zoo:b", 2)]  # extra seeds last
    assert [p.arms_for(r) for r in reps] == [["plain", "dnq", "sam"]] * 4 + [["plain", "dnq"]] * 2
    # what the folder lists: the extra replicates have no sam member, run or not
    write_json(tmp_path / "protocol.json", p.to_dict())
    listed = {(m["replicate"], m["arm"]) for m in collect(tmp_path)["members"]}
    assert len(listed) == 4 * 3 + 2 * 2 and (reps[4].name, "sam") not in listed and (reps[4].name, "dnq") in listed
    # the search still judges on the main seeds
    q = _protocol(families=fams, arms={**arms, "dnq": {"method": "dnq", "noise_mult": "search"}})
    assert all(r.seed in (0, 1) for r in q.search_replicates())
    for bad, words in (({"seeds": [1], "arms": ["plain"]}, "already among its seeds"),
                       ({"seeds": [2], "arms": ["dnq"]}, "include the control"),
                       ({"seeds": [2], "arms": ["plain", "swa"]}, "must be arms"),
                       ({"seeds": [2]}, "extra needs seeds")):
        with pytest.raises(ConfigError, match=words):
            _protocol(families={"f": {**fams["f"], "extra": bad}}, arms=arms, search=None)


def test_a_family_may_run_fewer_arms_on_its_own_budget(tmp_path: Path):
    # a costly family (the full dataset) runs the main arms on a shorter fine-tune; the others keep
    # every arm and the protocol's budget, and the search stays on the first family's budget
    fams = {"mini": {"parents": ["zoo:a"], "seeds": [0, 1, 2]},
            "full": {"parents": ["zoo:b"], "seeds": [0, 1], "arms": ["plain", "dnq"], "epochs": 0.15, "n_eval": 500}}
    arms = {"plain": {"method": "plain"}, "dnq": {"method": "dnq", "noise_mult": "search"}, "sam": {"method": "sam"}}
    p = _protocol(families=fams, arms=arms, epochs=[1, 3])
    assert p.arms_of("mini") == ["plain", "dnq", "sam"] and p.arms_of("full") == ["plain", "dnq"]
    assert p.epochs_for("mini") == [1.0, 3.0] and p.epochs_for("full") == [0.15]
    assert [(r.name, e) for r, e in p.budgets()] == [("a-s0", 1.0), ("a-s1", 1.0), ("a-s2", 1.0), ("b-s0", 0.15),
                                                      ("b-s1", 0.15), ("a-s0", 3.0), ("a-s1", 3.0), ("a-s2", 3.0)]
    assert p.search_epochs() == 1.0
    assert p.n_eval_for("mini") is None and p.n_eval_for("full") == 500  # its first 500 test images
    from workbench.batch.finetune_study import arm_major

    order = [(a, r.name, e) for a, r, e in arm_major(p)]  # arm by arm: a run stopped early has whole arms
    assert order[:5] == [("plain", "a-s0", 1.0), ("plain", "a-s1", 1.0), ("plain", "a-s2", 1.0),
                         ("plain", "b-s0", 0.15), ("plain", "b-s1", 0.15)]
    assert [a for a, _, _ in order] == ["plain"] * 8 + ["dnq"] * 8 + ["sam"] * 6
    from workbench.batch.finetune_study import _job

    jobs = {r.family: _job(p, tmp_path, r, {"method": "plain"}, e, settings=[], val_settings=[], curvature=False)
            for r, e in p.budgets()}
    assert (jobs["mini"]["n_eval"], jobs["full"]["n_eval"], jobs["full"]["epochs"]) == (None, 500, 0.15)
    write_json(tmp_path / "protocol.json", p.to_dict())
    listed = {(m["replicate"], m["arm"], m["epochs"]) for m in collect(tmp_path)["members"]}
    assert len(listed) == 3 * 3 * 2 + 2 * 2 and ("b-s0", "sam", 0.15) not in listed and ("b-s1", "dnq", 0.15) in listed
    assert not any(rep.startswith("b-") and ep != 0.15 for rep, _, ep in listed)
    text = fr.markdown(collect(tmp_path), [], [], [], [], p.to_dict(), source="t")
    assert ("`zoo:b` x fine-tune seeds [0, 1]; arms `plain`, `dnq` only; budget [0.15] epoch(s); judged on its "
            "first 500 test images") in text
    assert "- budgets: [1.0, 3.0] epoch(s) (full: [0.15]); validation split: 200 training images" in text
    for bad, words in (({"arms": ["dnq"]}, "the control"), ({"arms": ["plain", "swa"]}, "arms of the protocol"),
                       ({"epochs": 0}, "epochs must be numbers > 0"), ({"epochs": [1, "x"]}, "epochs must be"),
                       ({"budget": 1}, "unknown key"), ({"n_eval": 0}, "n_eval must be"), ({"n_eval": 2.5}, "whole")):
        with pytest.raises(ConfigError, match=words):
            _protocol(families={"mini": fams["mini"], "full": {**fams["full"], **bad}}, arms=arms)
    with pytest.raises(ConfigError, match="must be arms"):  # extra arms the family does not run
        _protocol(families={"full": {**fams["full"], "extra": {"seeds": [5], "arms": ["plain", "sam"]}}}, arms=arms,
                  search=None)


def test_the_finetune_warm_up_is_a_tenth_of_the_budget():
    from workbench import models
    from workbench.train import lr_factor

    assert models.finetune_recipe("vit-micro")["warmup_epochs"] == pytest.approx(0.1)  # the committed members'
    r = models.finetune_recipe("vit-micro", epochs=0.15)
    assert r["epochs"] == 0.15 and r["warmup_epochs"] == pytest.approx(0.015)
    # 69 steps (0.15 of a 461-step epoch): warm up over the first 7 (not 46, two thirds of the run,
    # as a one-epoch warm-up would), then a cosine decay that is half done by the middle of the rest
    steps, warm = 69, round(r["warmup_epochs"] * 461)
    ratio = r["min_lr"] / r["lr"]
    lrs = [lr_factor(s, steps, warm, ratio) for s in range(steps)]
    assert warm == 7 and lrs[warm - 1] == 1.0 and lrs[warm + 31] == pytest.approx(0.5 + ratio / 2) and lrs[-1] < 0.02


def test_settings_cover_draws_float_attention_and_strong_arms():
    p = _protocol(ptq={"bits": ["W4A4", "W3A3"], "observers": ["minmax", "mse"], "calib_draws": 3,
                       "draw_bits": ["W3A3"], "float_attention": ["W4A4"],
                       "strong": {"bc": {"observer": "mse", "bias_correction": True}}, "strong_arms": ["dnq"],
                       "strong_bits": ["W3A3"]})
    plain = [s.key for s in p.settings("plain")]
    assert plain == ["W4A4/minmax#0", "W4A4/mse#0", "W3A3/minmax#0", "W3A3/minmax#1", "W3A3/minmax#2",
                     "W3A3/mse#0", "W3A3/mse#1", "W3A3/mse#2", "W4A4/mse/float-attn#0"]
    assert [s.key for s in p.settings("dnq")] == plain + ["W3A3/bc#0"]


def test_the_wide_grid_adds_bits_and_observers_for_its_arms_and_families_only():
    ptq = {"bits": ["W4A4", "W3A3"], "observers": ["minmax", "mse"], "calib_draws": 2, "draw_bits": ["W4A4"],
           "wide": {"bits": ["W8A8", "W4A4"], "observers": ["percentile", "mse"], "arms": ["plain", "dnq"],
                    "families": ["fam"]}}
    p = _protocol(ptq=ptq, arms={"plain": {"method": "plain"}, "dnq": {"method": "dnq", "noise_mult": "search"},
                                 "sam": {"method": "sam"}})
    grid = ["W4A4/minmax#0", "W4A4/minmax#1", "W4A4/mse#0", "W4A4/mse#1", "W3A3/minmax#0", "W3A3/mse#0"]
    # W4A4/mse is measured by the grid already (two draws): the wide grid does not measure it again
    assert [s.key for s in p.settings("dnq", "fam")] == grid + ["W8A8/percentile#0", "W8A8/mse#0",
                                                                "W4A4/percentile#0"]
    assert [s.key for s in p.settings("sam", "fam")] == grid
    assert [s.key for s in p.settings("plain", "other")] == grid
    w = next(s for s in p.settings("plain", "fam") if s.label == "W8A8/percentile")
    assert (w.bits, w.column, dict(w.fields)) == ("W8A8", "percentile", {"observer": "percentile"})
    for bad, words in (({"bits": ["W8A8"], "arms": ["dnq"]}, "include the control"),
                       ({"bits": ["W8A8"], "arms": ["plain"], "families": ["nope"]}, "must be the protocol's"),
                       ({"arms": ["plain"]}, "needs bits and arms"), ({"bits": ["W8A9x"], "arms": ["plain"]}, "bit widths"),
                       ({"bits": ["W8A8"], "arms": ["plain"], "observer": ["mse"]}, "needs bits and arms")):
        with pytest.raises(ConfigError, match=words):
            _protocol(ptq={**ptq, "wide": bad})


# ----------------------------------------------------------------------------- members


def test_a_failed_member_is_recorded_and_reported(tmp_path: Path):
    rep = Replicate("fam", "zoo:no-such-model", 0)
    res = run_member(tmp_path / "m", rep, {"method": "plain"}, 1.0)
    assert res["status"] == "failed" and "no-such-model" in res["error"]
    status = json.loads((tmp_path / "m" / "status.json").read_text())
    assert status["status"] == "failed" and "Traceback" in status["traceback"]


def test_collect_lists_failed_and_unrun_members(tmp_path: Path):
    p = _protocol(search=None, arms={"plain": {"method": "plain"}, "dnq": {"method": "dnq"}})
    write_json(tmp_path / "protocol.json", p.to_dict())
    reps = p.replicates()
    write_json(tmp_path / "members" / member_id(reps[0], p.arm_config("plain"), 1.0) / "status.json",
               {"status": "failed", "error": "RuntimeError: out of memory"})
    tables = collect(tmp_path)
    status = {(m["replicate"], m["arm"]): m for m in tables["members"]}
    assert status[(reps[0].name, "plain")]["status"] == "failed"
    assert status[(reps[0].name, "plain")]["error"] == "RuntimeError: out of memory"
    assert status[(reps[1].name, "dnq")]["status"] == "not run"
    text = (tmp_path / "members.csv").read_text()
    assert "out of memory" in text


@pytest.mark.slow
def test_a_member_fine_tunes_measures_and_resumes_setting_by_setting(tmp_path: Path, one_torch_thread):
    rep = Replicate("fam", "zoo:vit-micro-mini-s0", 0)
    s1 = PTQSetting("W4A4/minmax", "W4A4", "minmax", {"observer": "minmax"}, 0)
    s2 = PTQSetting("W4A4/minmax", "W4A4", "minmax", {"observer": "minmax"}, 1)
    kw = dict(val_size=200, n_calib=32, n_eval=200, epochs=0.02)
    res = run_member(tmp_path, rep, {"method": "plain"}, settings=[s1], **kw)
    assert res["status"] == "done", res
    info = json.loads((tmp_path / "member.json").read_text())
    assert info["steps"] >= 1 and 0 < info["test_accuracy"] <= 100 and "val_accuracy" in info
    assert "workbench train --init zoo:vit-micro-mini-s0" in info["command"]
    model_mtime = (tmp_path / "run" / "model.pt").stat().st_mtime_ns
    first = fr.read_table(tmp_path / "ptq.csv")
    assert [(r["setting"], r["draw"]) for r in first] == [("W4A4/minmax", 0)]
    # a rerun with one more calibration draw: no retraining, the first row kept as it was, one row added
    res = run_member(tmp_path, rep, {"method": "plain"}, settings=[s1, s2], **kw)
    assert res["status"] == "done"
    assert (tmp_path / "run" / "model.pt").stat().st_mtime_ns == model_mtime
    rows = fr.read_table(tmp_path / "ptq.csv")
    assert rows[0] == first[0] and [(r["setting"], r["draw"]) for r in rows] == [("W4A4/minmax", 0),
                                                                                  ("W4A4/minmax", 1)]


def test_the_committed_report_is_what_its_tables_say():
    """docs/results.md's fine-tune block, the committed tables and notebook 08 come from one source:
    the block is exactly what the report code computes again from the committed CSVs."""
    root = Path(__file__).resolve().parents[1]
    report = fr.load_report(fr.committed_results())
    text = (root / "docs" / "results.md").read_text(encoding="utf-8")
    block = text.split(fr.BEGIN, 1)[1].split(fr.END, 1)[0].strip()
    assert block == report["markdown"].strip()
    # and each committed report folder's report.md is what its own tables give
    for folder in sorted((root / "docs" / "results").glob("finetune*")):
        assert (folder / "report.md").read_text(encoding="utf-8") == fr.load_report(folder)["markdown"], folder
    # and the headline rows behind it pair every replicate the protocol runs the arm on (the
    # extra seeds only for the arms named with them), at W4A4 and W3A3, in every family
    protocol = Protocol.from_dict(report["protocol"])
    rows = fr.headline_rows(report, columns=["mse"])
    assert {r["family"] for r in rows} == set(protocol.families)
    for r in rows:
        expected = sum(r["arm"] in protocol.arms_for(rep) for rep in protocol.replicates(r["family"]))
        assert r["pairs"] == expected, r


def test_a_report_folder_is_rendered_again_from_its_own_tables(tmp_path: Path):
    import shutil

    dest = tmp_path / "report"
    shutil.copytree(Path(__file__).resolve().parents[1] / "docs" / "results" / "finetune-w3", dest)
    raw = {n: (dest / f"{n}.csv").read_bytes() for n in ("members", "ptq", "search")}
    (dest / "report.md").write_text("stale\n")
    (dest / "compute.csv").unlink()
    md = tmp_path / "results.md"
    md.write_text(f"# Results\n\n{fr.BEGIN}\nold\n{fr.END}\n\nkept\n")
    paths = fr.rewrite_report(dest, md=md)
    text = (dest / "report.md").read_text(encoding="utf-8")
    assert text == fr.load_report(dest)["markdown"] and "where it went: fine-tuning" in text
    assert (dest / "compute.csv").is_file() and paths["compute"] == dest / "compute.csv"
    assert {n: (dest / f"{n}.csv").read_bytes() for n in raw} == raw  # the raw tables are not touched
    body = md.read_text(encoding="utf-8")
    assert "old" not in body and body.endswith("kept\n") and text.strip() in body


def test_curvature_is_paired_by_replicate_with_a_hand_computed_interval():
    # dnq - plain trace differences -10, -12, -14 over three replicates: mean -12, sd 2, t(0.975, 2)
    # = 4.3027 -> half-width 4.3027 * 2 / sqrt(3) = 4.968; the interval excludes 0 (lower: flatter).
    # sigma_trace differences +1, -1, +3 at 4 bits: mean 1, sd 2 -> [-3.97, +5.97], not distinguishable.
    curv = []
    for i, (tr_plain, tr_dnq, s_plain, s_dnq) in enumerate([(100, 90, 5, 6), (120, 108, 7, 6), (90, 76, 4, 7)]):
        for arm, tr, st in (("plain", tr_plain, s_plain), ("dnq", tr_dnq, s_dnq)):
            for b in (4, 3):
                curv.append({"family": "fam", "epochs": 1.0, "replicate": f"r{i}", "arm": arm, "w_bits": b,
                             "trace": float(tr), "top_eigenvalue": float(tr) / 10, "sigma_trace": float(st) * (5 - b),
                             "measured_increase": 0.01})
    rows = {(r["measure"], r["w_bits"]): r for r in fr.curvature_paired(curv) if r["arm"] == "dnq"}
    # the trace and the top eigenvalue do not depend on the bits: reported once, under the largest
    assert ("trace", 3) not in rows and ("top_eigenvalue", 3) not in rows and ("sigma_trace", 3) in rows
    tr = rows[("trace", 4)]
    assert tr["n_pairs"] == 3 and tr["diff_mean"] == pytest.approx(-12.0)
    assert (tr["diff_ci_low"], tr["diff_ci_high"]) == pytest.approx((-12 - 4.9685, -12 + 4.9685), abs=1e-3)
    assert tr["verdict"] == "worse"  # lower than the control, and the interval excludes 0
    st = rows[("sigma_trace", 4)]
    assert st["diff_mean"] == pytest.approx(1.0) and st["verdict"] == "not distinguishable"
    text = fr.curvature_paired_markdown(fr.curvature_paired(curv), "plain")
    assert "-12 [-17, -7] ▼" in text and "| fam | - | trace |" in text


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "docs" / "study" / "finetune")
                                        .glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_protocol_passes_its_checks_and_resolves_its_searched_arms(path: Path):
    """A protocol file the docs tell people to run must not fail on its first member: every name and
    setting checks out, and each searched arm takes the chosen value (here 2.0) in every field it
    searches, the rest of its spec as written."""
    protocol = Protocol.from_file(path)
    protocol.check()
    assert protocol.replicates() and protocol.budgets()
    for arm, spec in protocol.arms.items():
        resolved = protocol.arm_config(arm, {"noise_mult": 2.0})
        for key, value in spec.items():
            assert resolved[key] == (2.0 if value == "search" else value), (arm, key)
