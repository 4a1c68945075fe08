"""The reproduction study: study files, selection on the validation split, aggregation over seeds,
paired effects, and the Markdown report (on synthetic sweep folders), plus one tiny real study end to end."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from workbench.batch import scratch_collect, scratch_member, scratch_report, scratch_study, scratch_summary
from workbench.errors import ConfigError, RunDirError
from workbench.ptq import configs_from_bits
from workbench.quant import parse_bits_pair

ROOT = Path(__file__).resolve().parents[1]


def test_parse_config() -> None:
    assert parse_bits_pair("W4A8") == (4, 8)
    assert parse_bits_pair("w8a32") == (8, None)
    assert parse_bits_pair("W32A4") == (None, 4)
    for bad in ("4/4", "A4W4", "W4A", ""):
        with pytest.raises(ConfigError, match="cannot read bit widths"):
            parse_bits_pair(bad)
    with pytest.raises(ConfigError):
        parse_bits_pair("W1A8")  # 1 bit is out of range


def test_ptq_grid_crosses_bits_observers_attention() -> None:
    cfgs = configs_from_bits(["W8A8", "W4A4", "W2A4"], observers=["minmax", "percentile"], attention=[True, False],
                             n_calib=64)
    assert len(cfgs) == 12
    assert [(c.w_bits, c.a_bits) for c in cfgs[::4]] == [(8, 8), (4, 4), (2, 4)]
    assert {(c.observer, c.quant_attn) for c in cfgs} == {("minmax", True), ("minmax", False),
                                                           ("percentile", True), ("percentile", False)}
    assert all(c.n_calib == 64 and c.w_per_channel for c in cfgs)
    with pytest.raises(ConfigError):
        configs_from_bits(["W1A8"])  # 1 bit is out of range
    with pytest.raises(ConfigError, match="at least one"):
        configs_from_bits([])


def test_load_study_checks_keys(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("grid: {seed: [0]}\nsearch: {grid: {noise_mult: [1, 2]}}\n")
    spec = scratch_study.load_study(f)
    assert spec["notebook"] == scratch_member.MEMBER_NOTEBOOK
    assert spec["search"]["select"] == {"config": "W4A4", "observer": "minmax", "reference": "plain",
                                        "max_fp_loss": 0.5}
    f.write_text("grid: {seed: [0]}\nseeds: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        scratch_study.load_study(f)
    f.write_text("search: {parameters: {method: dnq}}\n")
    with pytest.raises(ConfigError, match="'search' needs a 'grid'"):
        scratch_study.load_study(f)
    f.write_text("search: {grid: {noise_mult: [1]}, select: {config: four}}\n")
    with pytest.raises(ConfigError, match="cannot read bit widths"):
        scratch_study.load_study(f)


def test_the_shipped_study_files_are_valid() -> None:
    from workbench.batch import execute

    files = sorted((ROOT / "docs" / "study").glob("*.yaml"))
    assert files
    for f in files:
        spec = scratch_study.load_study(f)
        declared = execute.notebook_parameters(execute.resolve_notebook(spec["notebook"]))
        keys = set(spec["parameters"]) | set(spec["grid"]) | {k for p in spec["include"] for k in p}
        if spec.get("search"):
            s = spec["search"]
            keys |= set(s.get("parameters") or {}) | set(s["grid"]) | {k for p in s.get("include") or [] for k in p}
        assert keys <= set(declared), (f.name, keys - set(declared))


# ---------------------------------------------------------------------------------------
# synthetic sweep folders


def _member(job: str, label: str, seed: int, fp: float, q: dict[str, float], *, method: str | None = None,
            model: str = "vit-micro", time_s: float = 10.0, trace: float = 100.0, noise_mult: float = 1.0,
            split: str = "test") -> dict:
    method = method or label.split("-")[0]
    member = {"model": model, "label": label, "method": method, "seed": seed, "noise_w_bits": 4, "noise_a_bits": 4,
              "noise_mult": noise_mult, "data": "fashion-mnist-mini", "split": split, "fp_accuracy": fp,
              "fp_loss": 0.5, "epochs": 3, "train_time_s": 3 * time_s, "epoch_time_s": time_s, "step_time_s": 0.1,
              "hardware": "CPU test", "top_eigenvalue": trace / 10, "trace": trace, "trace_stderr": 1.0,
              "sharpness_ascent": trace / 1000, "sigma_trace_w4": trace / 1e4, "predicted_increase_w4": trace / 2e4,
              "measured_increase_w4": trace / 2e4 * 1.1, "sigma_trace_w3": trace / 2e3,
              "predicted_increase_w3": trace / 4e3, "measured_increase_w3": trace / 4e3 * 0.9}
    ptq = [{"method": method, "config": "FP32", "w_bits": None, "a_bits": None, "observer": None, "quant_attn": None,
            "accuracy": fp, "loss": 0.5, "label": label, "split": split, "drop": 0.0, "loss_increase": 0.0}]
    for cfg, acc in q.items():
        w, a = parse_bits_pair(cfg)
        ptq.append({"method": method, "config": cfg, "w_bits": w, "a_bits": a, "observer": "minmax", "quant_attn": True,
                    "accuracy": acc, "loss": 0.6, "label": label, "split": split, "drop": fp - acc,
                    "loss_increase": 0.1})
    flat = [{"w_bits": 4, "top_eigenvalue": trace / 10, "trace": trace, "label": label, "n_hessian": 64}]
    return {"job": job, "member": member, "ptq": ptq, "flatness": flat}


def _write_sweep(folder: Path, members: list[dict], points: list[dict], failed: tuple[str, ...] = ()) -> Path:
    (folder / "jobs").mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"kind": "sweep", "points": points}))
    summary = []
    for m in members:
        res = folder / "jobs" / m["job"] / "results"
        res.mkdir(parents=True)
        for name in ("member", "ptq", "flatness"):
            rows = [m["member"]] if name == "member" else m[name]
            (res / f"{name}.json").write_text(json.dumps(rows))
        summary.append({"job": m["job"], "status": "ok"})
    for job in failed:
        (folder / "jobs" / job / "executed").mkdir(parents=True)
        summary.append({"job": job, "status": "failed", "message": "cell [7] raised RuntimeError: boom"})
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_select_search_respects_the_fp_budget(tmp_path: Path) -> None:
    members = [
        _member("000", "dnq", 0, 80.0, {"W4A4": 78.0}, noise_mult=0.5, split="val"),
        _member("001", "dnq", 0, 79.8, {"W4A4": 79.0}, noise_mult=1.0, split="val"),
        _member("002", "dnq", 0, 78.0, {"W4A4": 79.5}, noise_mult=2.0, split="val"),  # best W4A4, FP too low
        _member("003", "plain", 0, 80.1, {"W4A4": 70.0}, noise_mult=1.0, split="val"),
    ]
    points = [{"noise_mult": 0.5}, {"noise_mult": 1.0}, {"noise_mult": 2.0}, {"method": "plain", "noise_mult": 1.0}]
    folder = _write_sweep(tmp_path / "search", members, points)
    sel = scratch_collect.select_search(folder, {"config": "W4A4", "observer": "minmax", "reference": "plain",
                                       "max_fp_loss": 0.5}, ["noise_mult"])
    assert sel["values"] == {"noise_mult": 1.0} and sel["constrained"]
    by_k = {r["noise_mult"]: r for r in sel["table"]}
    assert [by_k[k]["eligible"] for k in (0.5, 1.0, 2.0)] == [True, True, False]
    assert by_k[1.0]["chosen"] and not by_k[2.0]["chosen"]
    assert by_k[None]["label"] == "plain (reference)" and by_k[None]["val_W4A4_accuracy"] == 70.0
    # with no budget the highest quantized accuracy wins
    sel = scratch_collect.select_search(folder, {"config": "W4A4", "max_fp_loss": float("inf")}, ["noise_mult"])
    assert sel["values"] == {"noise_mult": 2.0}
    # nobody within budget: the best overall, and the rule says so
    sel = scratch_collect.select_search(folder, {"config": "W4A4", "max_fp_loss": -5.0}, ["noise_mult"])
    assert sel["values"] == {"noise_mult": 2.0} and not sel["constrained"] and "none qualified" in sel["rule"]


def _main_members() -> list[dict]:
    rows, i = [], 0
    spec = {  # label: (fp per seed, W4A4 per seed, W3A3 per seed, epoch time, trace)
        "plain": ((84.0, 84.4, 83.8), (78.0, 77.0, 78.5), (60.0, 58.0, 62.0), 10.0, 800.0),
        "dnq": ((83.8, 84.1, 83.9), (82.5, 82.9, 82.4), (78.0, 77.5, 78.2), 11.0, 300.0),
        "sam": ((84.2, 84.0, 84.1), (80.0, 80.5, 79.9), (70.0, 69.0, 71.0), 20.0, 400.0),
        "swa": ((84.3, 84.2, 84.0), (79.0, 79.5, 78.8), (65.0, 66.0, 64.0), 10.0, 500.0),
    }
    for label, (fps, w4, w3, t, tr) in spec.items():
        for seed in range(3):
            rows.append(_member(f"{i:03d}", label, seed, fps[seed], {"W4A4": w4[seed], "W3A3": w3[seed]},
                                time_s=t, trace=tr + seed))
            i += 1
    return rows


def test_summarize_means_and_stds_over_seeds(tmp_path: Path) -> None:
    members = _main_members()
    folder = _write_sweep(tmp_path / "main", members, [{} for _ in members], failed=("012",))
    got = scratch_collect.collect_sweep(folder)
    assert len(got["members"]) == 12 and [f["job"] for f in got["failed"]] == ["012"]
    rows = {r["label"]: r for r in scratch_summary.summarize(got, ["W4A4", "W3A3"])["rows"]}
    assert list(rows) == ["plain", "dnq", "sam", "swa"]  # the canonical method order
    assert rows["dnq"]["fp_accuracy"] == pytest.approx(statistics.fmean([83.8, 84.1, 83.9]))
    assert rows["dnq"]["W4A4_minmax_accuracy_std"] == pytest.approx(statistics.stdev([82.5, 82.9, 82.4]))
    assert rows["plain"]["W3A3_minmax_drop"] == pytest.approx(statistics.fmean([24.0, 26.4, 21.8]))
    assert rows["sam"]["time_vs_plain"] == pytest.approx(2.0) and rows["dnq"]["time_vs_sam"] == pytest.approx(0.55)
    effects = {(e["config"], e["arm"]): e for e in scratch_summary.paired_effects(got, "vit-micro")}
    # dnq - plain at W4A4 per seed: 82.5-78.0, 82.9-77.0, 82.4-78.5
    d = effects[("W4A4", "dnq")]
    assert d["n_pairs"] == 3 and d["diff_mean"] == pytest.approx(statistics.fmean([4.5, 5.9, 3.9]))
    half = 4.302653 * statistics.stdev([4.5, 5.9, 3.9]) / 3 ** 0.5  # t(0.975, 2)
    assert d["diff_ci_low"] == pytest.approx(d["diff_mean"] - half, abs=1e-4) and d["verdict"] == "better"
    assert effects[("FP32", "dnq")]["verdict"] == "not distinguishable"  # -0.2, -0.3, +0.1
    assert effects[("FP32", "swa")]["verdict"] == "not distinguishable"  # +0.3, -0.2, +0.2
    assert effects[("W3A3", "sam")]["diff_mean"] == pytest.approx(statistics.fmean([10.0, 11.0, 9.0]))


def test_spearman_table_ranks_members(tmp_path: Path) -> None:
    members = _main_members()
    got = scratch_collect.collect_sweep(_write_sweep(tmp_path / "main", members, [{} for _ in members]))
    # each measure orders the 12 members differently against the measured increase 1..12;
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) with n (n^2 - 1) = 1716
    n = len(got["members"])
    swapped_pairs = [i + 1 if i % 2 == 0 else i - 1 for i in range(n)]  # 2,1,4,3,...: sum d^2 = 12
    for i, m in enumerate(got["members"]):
        m.update(measured_increase_w4=float(i + 1), trace=10.0 * (i + 1), top_eigenvalue=float(n - i),
                 sigma_trace_w4=float([1, 0, *range(2, n)][i]), predicted_increase_w4=float(swapped_pairs[i]))
    rho = {r["damage"]: r for r in scratch_summary.spearman_table(got)}["measured_increase_w4"]
    assert rho["trace"] == pytest.approx(1.0)
    assert rho["top_eigenvalue"] == pytest.approx(-1.0)
    assert rho["sigma_trace_w4"] == pytest.approx(1 - 6 * 2 / 1716)
    assert rho["predicted_increase_w4"] == pytest.approx(1 - 6 * 12 / 1716)
    # below 5 members no rank correlation is printed
    few = {**got, "members": got["members"][:4]}
    assert all(math.isnan(r["trace"]) for r in scratch_summary.spearman_table(few))


def test_report_splices_into_markdown_and_keeps_the_rest(tmp_path: Path) -> None:
    members = _main_members()
    out = tmp_path / "study"
    _write_sweep(out / "main", members, [{} for _ in members])
    md = tmp_path / "docs" / "results.md"
    md.parent.mkdir()
    md.write_text(f"# Results\n\nIntro by hand.\n\n{scratch_report.BEGIN}\nold numbers\n{scratch_report.END}\n\n## Discussion\nkept\n")
    paths = scratch_report.write_report(out, dest=tmp_path / "docs" / "results" / "study", md=md, bits=["W4A4", "W3A3"])
    text = md.read_text()
    assert text.startswith("# Results\n\nIntro by hand.") and text.endswith("## Discussion\nkept\n")
    assert "old numbers" not in text and text.count(scratch_report.BEGIN) == 1
    assert "| dnq | 83.93 ± 0.15 | 82.60 ± 0.26 | 77.90 ± 0.36 |" in text
    assert "(results/study/figures/accuracy_vs_bits_vit-micro.html)" in text
    for name in ("members.csv", "ptq.csv", "summary.csv", "spearman.csv", "figures/trace_vs_drop_vit-micro.html",
                 "figures/accuracy_vs_bits_vit-micro.json"):
        assert (paths["dest"] / name).is_file(), name
    # a folder without finished members is an error, not an empty report
    empty = tmp_path / "empty"
    _write_sweep(empty / "main", [], [])
    with pytest.raises(RunDirError, match="no study member finished"):
        scratch_report.write_report(empty)


# ---------------------------------------------------------------------------------------
# one tiny real study


def test_tiny_study_end_to_end(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "parameters: {epochs: 1, limit_train: 400, limit_test: 200, n_calib: 64, n_hessian: 32, probes: 3,\n"
        "             eig_iters: 3, bits: [W8A8, W4A4], observers: [minmax], attention: [true],\n"
        "             model_args: {depth: 1, embed_dim: 32, num_heads: 2, stem_width: 16}}\n"
        "grid: {method: [plain, dnq]}\n"
        "search:\n"
        "  parameters: {method: dnq, val_size: 200}\n"
        "  grid: {noise_mult: [2.0]}\n"
        "  include: [{method: plain, noise_mult: 1.0}]\n")
    res = scratch_study.run_study(spec, tmp_path / "out", jobs=1, html=False, progress=False,
                          md=tmp_path / "results.md")
    assert res["selected"] == {"noise_mult": 2.0}
    assert not res["main"]["failed"] and not res["search"]["failed"]
    members = json.loads((tmp_path / "out" / "main" / "jobs" / "001" / "results" / "member.json").read_text())
    assert members[0]["method"] == "dnq" and members[0]["noise_mult"] == 2.0 and members[0]["split"] == "test"
    search = json.loads((tmp_path / "out" / "search" / "jobs" / "000" / "results" / "member.json").read_text())
    assert search[0]["split"] == "val"
    assert (tmp_path / "out" / "notebook" / f"{scratch_member.MEMBER_NOTEBOOK}.ipynb").is_file()
    assert "Noise multiplier search" in (tmp_path / "results.md").read_text()
    # another observer added afterwards from the saved checkpoints, without retraining
    added = scratch_study.add_ptq(tmp_path / "out", bits=["W4A4"], observers=["percentile"], progress=False)
    assert sorted(r["job"] for r in added) == ["000", "001"] and all(r["rows"] == 1 for r in added)
    got = scratch_collect.collect_sweep(tmp_path / "out" / "main")
    pct = [r for r in got["ptq"] if r["observer"] == "percentile"]
    assert len(pct) == 2 and sum(r["config"] == "FP32" for r in got["ptq"]) == 2  # no duplicate FP rows
    fp = {r["job"]: r["accuracy"] for r in got["ptq"] if r["config"] == "FP32"}
    assert all(r["drop"] == pytest.approx(fp[r["job"]] - r["accuracy"]) for r in pct)  # same data, same FP
    with pytest.raises(RunDirError, match="already has ptq_percentile"):
        scratch_study.add_ptq(tmp_path / "out", bits=["W4A4"], observers=["percentile"], progress=False)
    # the main sweep again (one member), reusing the finished search instead of searching again
    spec.write_text(spec.read_text().replace("grid: {method: [plain, dnq]}", "grid: {method: [dnq]}"))
    res2 = scratch_study.run_study(spec, tmp_path / "out2", html=False, progress=False, search_from=tmp_path / "out")
    assert res2["selected"] == {"noise_mult": 2.0} and "search" not in res2
    assert len(res2["main"]["jobs"]) == 1 and not res2["main"]["failed"]
    assert json.loads((tmp_path / "out2" / "selected.json").read_text())["reused_from"] == str(tmp_path / "out")
    with pytest.raises(RunDirError, match="no finished search"):
        scratch_study.run_study(spec, tmp_path / "out3", search_from=tmp_path / "out2" / "main")
    assert not (tmp_path / "out3").exists()


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench import cli

    assert cli.main(["study", "run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) != 0
    assert "cannot read study file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main(["study", "report", str(tmp_path)]) != 0
    assert "not a sweep folder" in capsys.readouterr().err


def test_sweeps_added_to_a_study_are_merged(tmp_path: Path) -> None:
    members = _main_members()
    _write_sweep(tmp_path / "main", members[:6], [{} for _ in members[:6]])
    _write_sweep(tmp_path / "main-extra", [{**m, "job": f"{i:03d}"} for i, m in enumerate(members[6:])],
                 [{} for _ in members[6:]])
    got = scratch_collect.collect_study(tmp_path)
    assert len(got["members"]) == 12 and len({m["job"] for m in got["members"]}) == 12
    assert {m["job"] for m in got["members"] if m["job"].startswith("main-extra/")} == \
        {f"main-extra/{i:03d}" for i in range(6)}
    rows = {r["label"]: r for r in scratch_summary.summarize(got, ["W4A4"])["rows"]}
    assert rows["sam"]["seeds"] == 3 and rows["sam"]["W4A4_minmax_accuracy"] == pytest.approx(80.1333, abs=1e-3)
