"""workbench.batch (execute, sweep, report, clean): papermill execution, sweeps, reports; fixture notebooks include broken ones.

The fixture notebooks are tiny (no torch work), so most of the cost is kernel start-up. The
real notebooks with non-default parameters run in the ``slow`` tests at the end.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from workbench.batch import clean as nbclean
from workbench.batch import execute, report, sweep
from workbench.cli import common
from workbench.cli import run as clirun
from workbench.errors import ConfigError, NotebookError, RunDirError

ROOT = Path(__file__).resolve().parents[1]


def _write_nb(path: Path, params_src: str, *cells: str) -> Path:
    pcell = new_code_cell(params_src)
    pcell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# fixture"), pcell, *(new_code_cell(c) for c in cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


GOOD = (
    "from workbench import nbtools as nbt\n"
    "out = nbt.start('{name}', dict(x=x, fail=fail, out_dir=out_dir))",
    "import sys\nnbt.save_table([{{'x': x, 'python': sys.executable}}], out, 'facts')",
    "if fail:\n    raise ValueError(f'x={{x}} is not allowed')",
    "nbt.save_summary(out, [{{'x': x, 'double': 2 * x}}])",
)


@pytest.fixture()
def nbdir(tmp_path: Path) -> Path:
    d = tmp_path / "nbs"
    d.mkdir()
    _write_nb(d / "00_first.ipynb", "x = 1\nfail = False\nout_dir = None", *(c.format(name="00_first") for c in GOOD))
    _write_nb(d / "01_second.ipynb", "x = 2\nfail = False\nout_dir = None",
              *(c.format(name="01_second") for c in GOOD))
    return d


def test_run_notebooks_layout_summary_report_and_kernel(nbdir: Path, tmp_path: Path, monkeypatch) -> None:
    # A decoy 'python3' kernelspec that cannot start: the runner must use this interpreter anyway.
    decoy = tmp_path / "decoy" / "kernels" / "python3"
    decoy.mkdir(parents=True)
    (decoy / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/python", "-m", "ipykernel_launcher",
                                                            "-f", "{connection_file}"],
                                                   "display_name": "decoy", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "decoy"))
    out = tmp_path / "run"
    res = execute.run_notebooks(out, folder=nbdir, params={"x": 5}, progress=False)
    assert [r["status"] for r in res["notebooks"]] == ["ok", "ok"], res
    assert not res["failed"]
    for stem in ("00_first", "01_second"):
        assert (out / "executed" / f"{stem}.ipynb").is_file()
        assert (out / "executed" / f"{stem}.html").stat().st_size > 1000
        facts = json.loads((out / "results" / stem / "facts.json").read_text())
        assert facts[0]["x"] == 5  # the -p override reached every notebook declaring it
        assert facts[0]["python"] == sys.executable
        run = json.loads((out / "results" / stem / "run.json").read_text())
        assert run["params"]["x"] == 5 and "versions" in run and "git" in run
    meta = json.loads((out / "run.json").read_text())
    assert meta["kind"] == "run" and meta["profile"] == "quick"
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["notebook"], r["double"]) for r in rows] == [("00_first", "10"), ("01_second", "10")]
    assert "00_first" in (out / "report.html").read_text()
    # never overwritten silently: the run folder, and the report
    with pytest.raises(RunDirError):
        execute.run_notebooks(out, folder=nbdir, progress=False)
    with pytest.raises(RunDirError):
        report.make_report(out)
    assert report.make_report(out, overwrite=True)["csv"].is_file()


def test_run_reports_failing_cell_and_goes_on(nbdir: Path, tmp_path: Path) -> None:
    res = execute.run_notebooks(tmp_path / "run", folder=nbdir, params={"fail": True}, progress=False,
                               html=False, report=False)
    assert [r["status"] for r in res["notebooks"]] == ["failed", "failed"]
    r = res["notebooks"][0]
    assert r["error_name"] == "ValueError" and "not allowed" in r["error_value"]
    assert r["exec_count"] == 5  # parameters, injected parameters, 2 cells, then the failing one
    text = report.format_summary(res["notebooks"])
    assert "FAILED" in text and "cell [5]" in text and "ValueError" in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary) == 2


def test_execute_notebook_raises_notebook_error(nbdir: Path, tmp_path: Path) -> None:
    with pytest.raises(NotebookError) as ei:
        execute.execute_notebook(nbdir / "00_first.ipynb", tmp_path / "x.ipynb", {"fail": True}, html=False,
                                raise_errors=True)
    e = ei.value
    assert e.notebook == "00_first" and e.error_name == "ValueError" and isinstance(e.cell_index, int)


def test_run_checks_names_before_touching_the_folder(nbdir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no notebook has parameter"):
        execute.run_notebooks(tmp_path / "a", folder=nbdir, params={"nope": 1}, progress=False)
    with pytest.raises(ConfigError, match="unknown profile"):
        execute.run_notebooks(tmp_path / "b", folder=nbdir, profile="huge", progress=False)
    with pytest.raises(ConfigError, match="available"):
        execute.run_notebooks(tmp_path / "c", folder=nbdir, notebooks=["99_missing"], progress=False)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_run_through_the_cli_exit_code_stop_on_error_and_notebook(nbdir: Path, tmp_path: Path, capsys) -> None:
    from workbench import cli

    first, second = str(nbdir / "00_first.ipynb"), str(nbdir / "01_second.ipynb")
    common = ["--no-progress", "--no-html", "--notebook", first, "--notebook", second]
    # a failing notebook: exit 8, and the rest still runs
    assert cli.main(["run", "--out", str(tmp_path / "a"), *common, "-p", "fail=True"]) == 8
    assert "2 failed" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "a" / "summary.json").read_text())) == 2
    # --stop-on-error: the first failure ends the run
    assert cli.main(["run", "--out", str(tmp_path / "b"), *common, "-p", "fail=True", "--stop-on-error"]) == 8
    rows = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [r["notebook"] for r in rows] == ["00_first"]
    assert not (tmp_path / "b" / "executed" / "01_second.ipynb").exists()
    capsys.readouterr()
    # --notebook picks one; success is exit 0 and --json prints the result
    assert cli.main(["run", "--out", str(tmp_path / "c"), "--no-progress", "--no-html", "--notebook", second,
                     "-p", "x=7", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["notebook"] for r in res["notebooks"]] == ["01_second"] and not res["failed"]
    assert json.loads((tmp_path / "c" / "results" / "01_second" / "facts.json").read_text())[0]["x"] == 7


def test_relative_paths_mean_what_they_mean_where_the_command_was_typed(tmp_path: Path, monkeypatch) -> None:
    # papermill runs a notebook in its own folder; relative paths given to `workbench run` must not follow
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_nb(nbs / "00_paths.ipynb", "ckpt_dir = None\nout_dir = None",
              "from workbench import nbtools as nbt\nfrom pathlib import Path\n"
              "out = nbt.start('00_paths', dict(ckpt_dir=ckpt_dir, out_dir=out_dir))\n"
              "nbt.save_summary(out, [{'ckpt_dir': ckpt_dir, 'exists': Path(ckpt_dir).is_dir()}])")
    shell = tmp_path / "shell"
    (shell / "ckpts").mkdir(parents=True)
    monkeypatch.chdir(shell)
    res = execute.run_notebooks("rel-out", folder=nbs, params={"ckpt_dir": "ckpts"}, progress=False, html=False)
    assert not res["failed"], res["failed"]
    assert Path(res["out"]) == shell / "rel-out"
    row = json.loads((shell / "rel-out" / "results" / "00_paths" / "summary.json").read_text())[0]
    assert row == {"ckpt_dir": str(shell / "ckpts"), "exists": True}
    assert not (nbs / "rel-out").exists()


def test_notebook_parameter_values_are_checked_before_anything_runs(tmp_path: Path, capsys) -> None:
    from workbench import cli

    for bad, says in ((["-p", "epochs=-1"], "epochs=-1"), (["-p", "methods=[plain,dnqq]"], "dnqq"),
                      (["-p", "bits=[4,99]"], "out of range"), (["-p", "data=fashion-mnst"], "fashion-mnist"),
                      (["-p", "limit_train=-5"], "limit_train"), (["-p", "device=tpu"], "tpu")):
        out = tmp_path / "x"
        assert cli.main(["run", "--out", str(out), "--no-progress", *bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()  # refused before the folder was made or any notebook started


def test_sweep_runs_grid_in_processes_and_lists_failures(nbdir: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"notebook: {nbdir / '00_first.ipynb'}\nparameters: {{x: 3}}\n"
                    "grid:\n  fail: [false, true]\n  x: [1, 2]\n")
    res = sweep.run_sweep(grid, tmp_path / "sweep", jobs=2, html=False, progress=False)
    assert [r["point"] for r in res["jobs"]] == [{"fail": False, "x": 1}, {"fail": False, "x": 2},
                                                 {"fail": True, "x": 1}, {"fail": True, "x": 2}]
    assert [r["status"] for r in res["jobs"]] == ["ok", "ok", "failed", "failed"]
    assert {r["error_name"] for r in res["failed"]} == {"ValueError"}
    assert all(r["exec_count"] == 5 for r in res["failed"])
    rows = list(csv.DictReader((tmp_path / "sweep" / "report.csv").open()))
    assert [(r["unit"], r["x"], r["double"]) for r in rows] == [("000", "1", "2"), ("001", "2", "4")]
    html = (tmp_path / "sweep" / "report.html").read_text()
    assert "failed" in html and "ValueError" in html


def test_sweep_file_errors(tmp_path: Path, nbdir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {x: [1]}\n")
    with pytest.raises(ConfigError, match="needs 'notebook'"):
        sweep.load_grid(bad)
    bad.write_text(f"notebook: {nbdir / '00_first.ipynb'}\ngrid: {{x: 1}}\n")
    with pytest.raises(ConfigError, match="non-empty lists"):
        sweep.load_grid(bad)
    bad.write_text(f"notebook: {nbdir / '00_first.ipynb'}\ngrid: {{y: [1]}}\n")
    with pytest.raises(ConfigError, match="no parameter"):
        sweep.run_sweep(bad, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    assert sweep.grid_points({"a": [1, 2], "b": ["u"]}) == [{"a": 1, "b": "u"}, {"a": 2, "b": "u"}]
    bad.write_text(f"notebook: {nbdir / '00_first.ipynb'}\ngrid: {{x: [1]}}\ninclude: [3]\n")
    with pytest.raises(ConfigError, match="'include' must be a list"):
        sweep.load_grid(bad)


def test_grid_include_points_cross_the_keys_they_leave_open() -> None:
    grid = {"method": ["plain", "dnq"], "seed": [0, 1]}
    pts = sweep.grid_points(grid, [{"method": "dnq", "w_bits": 3}, {"method": "sam", "seed": 5}])
    assert pts[:4] == [{"method": m, "seed": s} for m in ("plain", "dnq") for s in (0, 1)]
    assert pts[4:] == [{"method": "dnq", "seed": 0, "w_bits": 3}, {"method": "dnq", "seed": 1, "w_bits": 3},
                       {"method": "sam", "seed": 5}]


def test_example_grid_is_valid() -> None:
    for path in sorted((ROOT / "notebooks" / "sweeps").glob("*.yaml")):
        spec = sweep.load_grid(path)
        declared = execute.notebook_parameters(execute.resolve_notebook(spec["notebook"]))
        keys = set(spec["grid"]) | set(spec["parameters"]) | {k for p in spec["include"] for k in p}
        assert keys <= set(declared), path.name


def test_parse_params() -> None:
    p = common.parse_kv(["epochs=3", "methods=[plain, dnq]", "model_args={depth: 4}", "out_dir=None",
                             "data=digits", "noise-mult=0.5"])
    assert p == {"epochs": 3, "methods": ["plain", "dnq"], "model_args": {"depth": 4}, "out_dir": None,
                 "data": "digits", "noise_mult": 0.5}
    with pytest.raises(ConfigError):
        common.parse_kv(["epochs"])


def test_one_key_value_reader_for_every_flag() -> None:
    """-p, --method-arg, --train-arg and --model-arg share one reader: JSON numbers (which YAML 1.1
    would leave as the string '1e-3'), YAML lists and Python's True, the empty value as ''."""
    p = common.parse_kv(["lr=1e-3", "swa_every=5", "flag=True", "name=", "bits=[4, 3]", "tag=a=b"], "--train-arg")
    assert p == {"lr": 0.001, "swa_every": 5, "flag": True, "name": "", "bits": [4, 3], "tag": "a=b"}
    assert isinstance(p["lr"], float) and isinstance(p["swa_every"], int)
    with pytest.raises(ConfigError, match="--method-arg expects key=value"):
        common.parse_kv(["noise_mult"], "--method-arg")


def test_report_refuses_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="no workbench run"):
        report.make_report(tmp_path)


def test_cli_hooks_parse(tmp_path: Path) -> None:
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    for add in (clirun.add_run_parser, clirun.add_sweep_parser, clirun.add_report_parser):
        add(sub, lambda sp: sp.add_argument("--json", action="store_true"))
    a = p.parse_args(["run", "--out", "x", "-p", "epochs=1", "--profile", "full"])
    assert (a.profile, a.param, a.out) == ("full", ["epochs=1"], "x")
    a = p.parse_args(["sweep", "g.yaml", "--out", "y", "--jobs", "2"])
    assert (a.grid, a.jobs) == ("g.yaml", 2)
    a = p.parse_args(["report", "z", "--overwrite", "--json"])
    assert a.overwrite and a.json


# ---------------------------------------------------------------------------------------
# the real notebooks with non-default parameters (another dataset and model)


@pytest.mark.slow
@pytest.mark.parametrize("notebook,params", [
    ("00_quickstart", {"init": None, "data": "digits", "model": "cnn-small", "model_args": {"width": 8}, "epochs": 1,
                       "limit_train": 600, "limit_test": 200, "n_calib": 64, "noise_bits": "W3A6",
                       "seeds": [0]}),
    ("02_ptq", {"init": None, "data": "digits", "model": "cnn-small", "model_args": {"width": 8}, "epochs": 1,
                "limit_train": 600, "limit_test": 200, "n_calib": 64, "bits": [8, 4]}),
])
def test_real_notebook_with_other_parameters(notebook: str, params: dict, tmp_path: Path) -> None:
    nb = execute.resolve_notebook(notebook)
    params = {k: v for k, v in params.items() if k in execute.notebook_parameters(nb)}
    row = execute.execute_notebook(nb, tmp_path / "executed.ipynb", {**params, "out_dir": str(tmp_path / "res")},
                                  html=True, cwd=nb.parent)
    assert row["status"] == "ok", row.get("message")
    run = json.loads((tmp_path / "res" / "run.json").read_text())
    assert run["params"]["data"] == "digits" and run["params"]["model"] == "cnn-small"
    assert json.loads((tmp_path / "res" / "summary.json").read_text())
    assert Path(row["html"]).is_file()


def test_clean_notebook_keeps_only_checked_outputs(tmp_path: Path) -> None:
    from nbformat.v4 import new_output

    path = _write_nb(tmp_path / "n.ipynb", "x = 1", "# NBVAL_CHECK_OUTPUT\nprint(x)", "x")
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].outputs = [new_output("stream", name="stdout", text="old\n")]
    nb.cells[2].execution_count = 3
    nb.cells[3].outputs = [new_output("execute_result", data={"text/plain": "1", "text/html": "<b>1</b>"},
                                      execution_count=4)]
    nb.metadata["papermill"] = {"parameters": {}}
    nbformat.write(nb, path)
    executed = tmp_path / "executed.ipynb"
    nb.cells[2].outputs = [new_output("stream", name="stdout", text="1\n")]
    nbformat.write(nb, executed)
    assert nbclean.clean_notebook(path, executed) == 1
    clean = nbformat.read(path, as_version=4)
    assert clean.cells[2].outputs[0]["text"] == "1\n" and clean.cells[2].execution_count == 2
    assert clean.cells[3].outputs == [] and "papermill" not in clean.metadata
    bare = _write_nb(tmp_path / "bare.ipynb", "x = 1", "# NBVAL_CHECK_OUTPUT\nprint(x)")
    with pytest.raises(ConfigError, match="no usable output"):
        nbclean.clean_notebook(bare)


def test_absolute_paths_only_touch_path_parameters(tmp_path: Path) -> None:
    from workbench.nbparams import absolute_paths

    got = absolute_paths({"ckpt_dir": "a/../b", "results_dir": str(tmp_path / "abs"), "out_dir": None,
                          "data": "imagefolder:imgs", "model": "vit-micro", "methods": ["plain"], "label": "x/y"},
                         cwd=tmp_path)
    assert got == {"ckpt_dir": str(tmp_path / "b"), "results_dir": str(tmp_path / "abs"), "out_dir": None,
                   "data": f"imagefolder:{tmp_path / 'imgs'}", "model": "vit-micro", "methods": ["plain"],
                   "label": "x/y"}


def test_noise_bits_are_checked_before_a_notebook_runs() -> None:
    from workbench.nbparams import check_values

    check_values({"noise_bits": "W3A8", "methods": ["plain", "dnq"]})
    with pytest.raises(ConfigError, match="99"):
        check_values({"noise_bits": "W99A4"})
    with pytest.raises(ConfigError):
        check_values({"init": "timm:resnet10x"})  # not a timm model with pretrained weights



def test_strong_ptq_methods_are_checked_before_a_notebook_runs() -> None:
    from workbench.nbparams import check_values

    check_values({"strong_methods": {"AdaRound": {"reconstruction": "adaround", "recon_iters": 20}}})
    with pytest.raises(ConfigError, match="valid"):
        check_values({"strong_methods": {"typo": {"reconstrution": "adaround"}}})
    with pytest.raises(ConfigError, match="brecq"):
        check_values({"strong_methods": {"QDrop alone": {"qdrop": 0.5}}})
    with pytest.raises(ConfigError, match="maps a name"):
        check_values({"strong_methods": ["adaround"]})
