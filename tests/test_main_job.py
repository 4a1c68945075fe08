"""The README's main job as a user runs it: `workbench run` from the repository root with a relative
``--out``, through the real CLI and runner, made cheap with small parameters (digits, a narrow CNN
trained from scratch for one epoch). It runs the notebooks that share 00_quickstart's checkpoints
(01-05) and the report (07) that reads the whole run; the others (06, 08-10) read or train nothing
that the run shares, and nbval executes every notebook at its defaults anyway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.batch import execute

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-p", "init=None", "-p", "data=digits", "-p", "model=cnn-small", "-p", 'model_args={"width": 8}', "-p", "epochs=1",
        "-p", "limit_train=600", "-p", "limit_test=200", "-p", "n_calib=64", "-p", "n_hessian=64",
        "-p", "probes=4", "-p", "eig_iters=4", "-p", "seeds=[0, 1]"]
#: The notebooks (by number) that share 00's checkpoints, plus the report that reads the run.
SHARED = ("00", "01", "02", "03", "04", "05", "07")


@pytest.mark.slow
def test_workbench_run_from_the_repository_root_with_a_relative_out() -> None:
    rel = Path("runs") / f"pytest-main-job-{os.getpid()}"
    out = ROOT / rel
    try:
        chosen = [nb.stem for nb in execute.list_notebooks() if nb.stem[:2] in SHARED]
        p = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "--out", str(rel), "--no-progress",
                            "--no-html", *TINY, *(a for nb in chosen for a in ("--notebook", nb))],
                           cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        rows = json.loads((out / "summary.json").read_text())
        assert [r["notebook"] for r in rows] == chosen and len(chosen) == len(SHARED)
        assert all(r["status"] == "ok" for r in rows)
        # the report notebook read this run (it once looked for the relative folder under notebooks/)
        report = json.loads((out / "results" / "07_report" / "summary.json").read_text())[0]
        assert report["kind"] == "run" and report["units"] >= 6  # 00-05 (07 reads the run before it ends)
        assert (out / "report.csv").is_file()
        # the later notebooks reused 00_quickstart's checkpoints instead of training again
        ckpts = out / "results" / "00_quickstart" / "seed0" / "checkpoints"  # 00 runs seeds 0 and 1
        for nb in ("01_error_model", "02_ptq", "03_flatness", "04_preconditioning", "05_explorer"):
            params = json.loads((out / "results" / nb / "run.json").read_text())["params"]
            assert params["ckpt_dir"] == str(ckpts), nb
            for method in ("plain", "dnq"):  # 00's methods; 04 trains only the ones 00 did not
                assert not (out / "results" / nb / "checkpoints" / method).exists(), (nb, method)
        assert not (ROOT / "notebooks" / rel).exists()
    finally:
        shutil.rmtree(out, ignore_errors=True)
