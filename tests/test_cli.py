import json
import math
import subprocess
import sys

import pytest

from workbench import cli


def run_cli(*args):
    """Run the real console entry point in a subprocess; returns (rc, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_data_and_models_json(capsys):
    assert cli.main(["data", "list", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert "fashion-mnist-mini" in names and "imagefolder:PATH" in names
    assert cli.main(["data", "info", "fashion-mnist-mini", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train"] == 10000 and info["num_classes"] == 10
    assert cli.main(["models", "--json"]) == 0
    assert "vit-micro" in [r["name"] for r in json.loads(capsys.readouterr().out)]


def test_unknown_names_list_valid_ones(capsys, tmp_path):
    assert cli.main(["data", "info", "fashion-mnst"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'fashion-mnist'" in err and "fashion-mnist-mini" in err
    assert cli.main(["train", "--model", "vit-nano", "--out", str(tmp_path / "x")]) == 2
    assert "vit-micro" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing created before the options were checked


def test_train_then_eval_json_end_to_end(tmp_path):
    out = tmp_path / "run"
    # digits (1,437 8x8 training images) keeps the real end-to-end run to seconds
    rc, stdout, err = run_cli("train", "--data", "digits", "--model", "cnn-small", "--model-arg", "width=8",
                              "--epochs", "3", "--train-arg", "warmup_epochs=0.2", "--lr", "0.01", "--out", str(out),
                              "--json", "--no-progress")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["test_accuracy"] > 40 and res["checkpoint"].endswith("model.pt")
    rc, stdout, err = run_cli("eval", res["checkpoint"], "--json")
    assert rc == 0, err
    ev = json.loads(stdout)
    assert ev["accuracy"] == pytest.approx(res["test_accuracy"]) and ev["data"] == "digits"
    # the same output folder is refused rather than overwritten
    rc, _, err = run_cli("train", "--model", "cnn-small", "--epochs", "1", "--out", str(out))
    assert rc == 6 and "already exists" in err


def test_eval_of_a_non_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_text("hello")
    assert cli.main(["eval", str(bad)]) == 5
    assert "not a workbench checkpoint" in capsys.readouterr().err


def test_flatness_json(tmp_path, capsys):
    from workbench import data, models
    from workbench.checkpoint import save_checkpoint

    m = models.create("cnn-small", num_classes=10, in_chans=1, img_size=8, width=4)
    ckpt = save_checkpoint(tmp_path / "c.pt", m, data_info=data.load("digits").info.to_dict())
    assert cli.main(["flatness", str(ckpt), "--trace", "--eig", "2", "--wbits", "4", "--n-samples", "64",
                     "--max-probes", "6", "--landscape", "1d", "--steps", "5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["top_eigenvalues"]["eigenvalues"]) == 2 and rep["trace"]["probes"] >= 1
    # an untrained model sits far from a minimum: its Hessian is indefinite, the sigma-trace any sign
    assert set(rep["quant"]) == {"W4"} and math.isfinite(rep["quant"]["W4"]["sigma_trace"])
    assert len(rep["landscape"]["alphas"]) == 5 and rep["samples"] == 64
    # the landscape's centre is the model's own loss on the same images
    assert rep["landscape"]["losses"][2] == pytest.approx(rep["loss"], rel=1e-5)
