"""The workbench without its repository, as a course's JupyterHub installs it: a built wheel in a
fresh virtual environment, used from a folder outside the checkout. It must bring the embedded
dataset, the model zoo and the notebooks, fine-tune a zoo model, copy the notebooks out with
``workbench notebooks DIR`` and run one there.

The fresh environment borrows the third-party packages of this one through a ``.pth`` line
(only the wheel is installed into it), so the test needs no network and no second torch."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Never copied into the build tree: local environments, outputs and build leftovers.
_IGNORE = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_has_data_zoo_and_notebooks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    # 1. build the wheel from a copy of the source tree (the build writes build/ and egg-info)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "wheels")], cwd=tmp_path, env=env)
    wheel = next((tmp_path / "wheels").glob("flatquant_workbench-*.whl"))
    # 2. a fresh venv that sees this environment's dependencies, but not its editable workbench
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    py = venv / "bin" / "python"
    venv_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=tmp_path, env=env).stdout.strip())
    (venv_site / "_borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path, env=env)
    elsewhere = tmp_path / "course"
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import workbench, workbench.bundled as b; print(workbench.__file__); "
                  "print(b.repo_root())"], cwd=elsewhere, env=env).stdout.split()
    assert where[0].startswith(str(venv)) and where[1] == "None", where  # the wheel, not the checkout
    wb = str(venv / "bin" / "workbench")

    # 3. the embedded dataset and the zoo come with the package, checksums verified
    info = json.loads(_run([wb, "data", "info", "fashion-mnist-mini", "--json"], cwd=elsewhere, env=env).stdout)
    assert info["train"] == 10000
    zoo = {r["name"]: r for r in json.loads(_run([wb, "zoo", "list", "--json"], cwd=elsewhere, env=env).stdout)}
    assert zoo["cnn-small-mini"]["available"]

    # 4. a zoo fine-tune, with its relative --out in the user's folder
    _run([wb, "train", "--init", "zoo:cnn-small-mini", "--steps", "3", "--device", "cpu", "--no-progress",
          "--out", "ft"], cwd=elsewhere, env=env)
    run = json.loads((elsewhere / "ft" / "run.json").read_text())
    recorded = json.loads((ROOT / "data" / "zoo" / "zoo.json").read_text())["cnn-small-mini"]
    assert run["params"]["init"]["sha256"] == recorded["sha256"]
    assert run["git"]["commit"] is None  # not a checkout: no commit is claimed

    # 5. the notebooks, copied out and run there (the quantize-only path: no training)
    _run([wb, "notebooks", "nbs"], cwd=elsewhere, env=env)
    assert (elsewhere / "nbs" / "00_quickstart.ipynb").is_file() and (elsewhere / "nbs" / "sweeps").is_dir()
    again = subprocess.run([wb, "notebooks", "nbs"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # an edited copy is never replaced silently
    params = {"init": "zoo:cnn-small-mini", "epochs": 0, "seeds": [0], "limit_train": 500, "limit_test": 200,
              "n_calib": 64, "bits": ["W4A4"], "observers": ["minmax"], "out_dir": str(elsewhere / "res")}
    code = ("import json, sys; from workbench.batch import execute; "
            "row = execute.execute_notebook(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), html=False, "
            "cwd=sys.argv[4]); print(json.dumps(row))")
    row = json.loads(_run([str(py), "-c", code, str(elsewhere / "nbs" / "00_quickstart.ipynb"),
                           str(elsewhere / "executed.ipynb"), json.dumps(params), str(elsewhere / "nbs")],
                          cwd=elsewhere, env=env).stdout.strip().splitlines()[-1])
    assert row["status"] == "ok", row.get("message")
    rows = json.loads((elsewhere / "res" / "ptq.json").read_text())
    assert {r["label"] for r in rows} == {"parent"} and {r["config"] for r in rows} == {"FP32", "W4A4"}
