import json
import math
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------------
# bad input: one line saying what to do, exit code 2, nothing created in --out


def _one_line_error(err: str, command: str) -> str:
    """The error line of a refused command; there is no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(f"workbench {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def tiny_ckpt(tmp_path):
    from workbench import data, models
    from workbench.checkpoint import save_checkpoint

    m = models.create("cnn-small", num_classes=10, in_chans=1, img_size=8, width=4)
    return save_checkpoint(tmp_path / "c.pt", m, data_info=data.load("digits").info.to_dict())


def test_train_refuses_unknown_or_absent_devices(capsys, tmp_path):
    import torch

    out = tmp_path / "x"
    assert cli.main(["train", "--data", "digits", "--device", "tpu", "--out", str(out)]) == 2
    line = _one_line_error(capsys.readouterr().err, "train")
    assert "unknown device 'tpu'" in line and "cpu" in line and "cuda:N" in line
    # a device this machine does not have is refused as clearly
    absent = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert cli.main(["train", "--data", "digits", "--device", absent, "--out", str(out)]) == 2
    assert "use --device cpu or auto" in _one_line_error(capsys.readouterr().err, "train") or torch.cuda.is_available()
    assert not out.exists()  # nothing created before the check


def test_resolve_device_is_the_one_check(tiny_ckpt, capsys):
    import torch

    from workbench.errors import ConfigError
    from workbench.runinfo import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    assert resolve_device("auto") == resolve_device(None)
    for bad in ("tpu", "gpu", "cuda:x", "cpu:3", ""):
        with pytest.raises(ConfigError, match="cpu"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    # eval, flatness and ptq share it
    for argv in (["eval", str(tiny_ckpt)], ["flatness", str(tiny_ckpt)], ["ptq", str(tiny_ckpt)]):
        assert cli.main([*argv, "--device", "tpu"]) == 2
        assert "unknown device 'tpu'" in _one_line_error(capsys.readouterr().err, argv[0])


@pytest.mark.parametrize("val_size, words", [
    ("2.0", "neither a fraction below 1 nor a whole count"),
    ("1.5", "neither a fraction below 1 nor a whole count"),
    ("-3", "negative"),
    ("1437", "the training set has 1437 images"),
    ("5000", "1 to 1436"),
    ("ten", "not a number"),
])
def test_train_refuses_bad_val_size(val_size, words, capsys, tmp_path):
    out = tmp_path / "x"
    assert cli.main(["train", "--data", "digits", "--val-size", val_size, "--out", str(out)]) == 2
    assert words in _one_line_error(capsys.readouterr().err, "train")
    assert not out.exists()


@pytest.mark.parametrize("flag, value, words", [
    ("--eig", "0", "--eig 0 is out of range: use an integer >= 1"),
    ("--max-probes", "0", "--max-probes 0 is out of range"),
    ("--max-probes", "1", "a standard error needs two probes"),
    ("--n-samples", "0", "--n-samples 0 is out of range"),
    ("--batch-size", "0", "--batch-size 0 is out of range"),
    ("--deflate", "-1", "--deflate -1 is out of range"),
    ("--span", "0", "--span 0.0 is out of range"),
    ("--tol", "0", "--tol 0.0 is out of range"),
    ("--wbits", "99", "out of range: use 2 to 16 bits"),
])
def test_flatness_refuses_nonsensical_counts(flag, value, words, tiny_ckpt, capsys):
    assert cli.main(["flatness", str(tiny_ckpt), flag, value]) == 2
    assert words in _one_line_error(capsys.readouterr().err, "flatness")


@pytest.mark.parametrize("argv, words", [
    (["--bits", "99"], "w_bits=99 is out of range: use 2 to 16 bits, or 32"),
    (["--bits", "W4A64"], "a_bits=64 is out of range"),
    (["--wbits", "40"], "w_bits=40 is out of range"),
    (["--a-bits", "1"], "a_bits=1 is out of range"),
    (["--w-bits", "4,x"], "cannot read a bit width from 'x'"),
])
def test_ptq_bits_out_of_range(argv, words, tiny_ckpt, capsys):
    assert cli.main(["ptq", str(tiny_ckpt), *argv]) == 2
    line = _one_line_error(capsys.readouterr().err, "ptq")
    assert words in line and "nothing to sweep" not in line
    # 32 alone still means 'float only': nothing to sweep beyond the float row
    assert cli.main(["ptq", str(tiny_ckpt), "--bits", "32"]) == 2
    assert "nothing to sweep" in capsys.readouterr().err


def test_eval_val_split_without_a_recorded_one_says_so(tiny_ckpt, capsys):
    assert cli.main(["eval", str(tiny_ckpt), "--split", "val"]) == 2
    line = _one_line_error(capsys.readouterr().err, "eval")
    assert "no validation split" in line and "--val-size" in line


# ---------------------------------------------------------------------------------------
# train flags reach the run


TINY = ["--data", "digits", "--model", "cnn-small", "--model-arg", "width=4", "--no-progress"]


def test_train_flags_reach_the_run_and_eval_reloads_its_splits(tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "1", "--method", "wnoise", "--bits", "W4A8", "--noise-mult", "0.5",
                     "--method-arg", "ramp_epochs=0.5", "--method-arg", "schedule=ramp", "--val-size", "200",
                     "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    run = json.loads((out / "run.json").read_text())
    method = run["params"]["method"]
    assert method["method"] == "wnoise" and (method["w_bits"], method["a_bits"]) == (4, 8)
    assert method["noise_mult"] == 0.5 and method["ramp_epochs"] == 0.5 and method["schedule"] == "ramp"
    assert run["params"]["data"]["val_size"] == 200
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["method_config"] == method
    # --val-size: a validation split was held out and judged every epoch
    history = json.loads((out / "history.json").read_text())
    assert "val_accuracy" in history[-1] and "val_accuracy" in res and "val_loss" in res

    # eval reloads the run's own splits: val is the held-out 200 images, train the other 1,237
    assert cli.main(["eval", str(out / "model.pt"), "--split", "val", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n"] == 200 and ev["accuracy"] == pytest.approx(res["val_accuracy"], abs=1e-9)
    assert ev["loss"] == pytest.approx(res["val_loss"], rel=1e-5)
    assert cli.main(["eval", str(out / "model.pt"), "--split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1437 - 200
    assert cli.main(["eval", str(out / "model.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-9)


def test_ctrl_c_exits_130_and_resume_through_the_cli_finishes(tmp_path, capsys):
    import signal
    import time

    out = tmp_path / "run"
    # SAM (two passes a step) with its --rho: ~0.3 s epochs on digits, long enough to interrupt
    argv = [sys.executable, "-m", "workbench.cli", "train", *TINY, "--epochs", "5", "--method", "sam",
            "--rho", "0.07", "--out", str(out)]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        # a shell may start background jobs with SIGINT ignored; the child must see Ctrl-C as a user would
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err_file,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while not (out / "last.pt").exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)  # last.pt appears after the first epoch
            assert p.poll() is None, err_path.read_text()
            p.send_signal(signal.SIGINT)
            rc = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
    err = err_path.read_text()
    assert rc == cli.EXIT_INTERRUPTED == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert (out / "last.pt").is_file() and not (out / "model.pt").exists()
    # the same command plus --resume finishes the run (in this process: the signal needed a real one)
    assert cli.main([*argv[3:], "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 5
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    run = json.loads((out / "run.json").read_text())
    assert run["params"]["method"]["method"] == "sam" and run["params"]["method"]["rho"] == 0.07


def test_ptq_bias_correction_flag_reaches_the_rows(tiny_ckpt, capsys):
    assert cli.main(["ptq", str(tiny_ckpt), "--bits", "4", "--n-calib", "64", "--n-eval", "100", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main(["ptq", str(tiny_ckpt), "--bits", "4", "--n-calib", "64", "--n-eval", "100", "--json",
                     "--bias-correction"]) == 0
    corrected = json.loads(capsys.readouterr().out)
    assert [r["ptq_method"] for r in plain] == [None, "rtn"]
    assert [r["ptq_method"] for r in corrected] == [None, "rtn+bc"]
    assert corrected[1]["loss"] != plain[1]["loss"]  # the biases moved


def test_one_bit_width_vocabulary(tiny_ckpt, capsys) -> None:
    """--w-bits/--a-bits everywhere, the old --wbits/--abits kept; one list reader behind them."""
    from workbench.cli import build_parser
    from workbench.errors import ConfigError
    from workbench.quant import parse_bits_list

    parser = build_parser()
    for cmd in (["ptq", "C"], ["flatness", "C"]):
        new = parser.parse_args([*cmd, "--w-bits", "4,3", "--a-bits", "8"])
        old = parser.parse_args([*cmd, "--wbits", "4,3", "--abits", "8"])
        assert (new.wbits, new.abits) == (old.wbits, old.abits) == ("4,3", "8")
    assert parse_bits_list("8, 6,,32") == [8, 6, None] and parse_bits_list([4, "3"]) == [4, 3]
    assert parse_bits_list(4) == [4] and parse_bits_list(None) == []
    with pytest.raises(ConfigError, match="--candidates=32 is out of range: use 2 to 16 bits"):
        parse_bits_list("8,32", "--candidates", allow_float=False)
    # the ptq sweep reads both spellings the same way
    rows = {}
    for flags in (["--w-bits", "8", "--a-bits", "32"], ["--wbits", "8", "--abits", "32"]):
        assert cli.main(["ptq", str(tiny_ckpt), *flags, "--n-calib", "8", "--n-eval", "16", "--json"]) == 0
        rows[flags[0]] = [r["config"] for r in json.loads(capsys.readouterr().out)]
    assert rows["--w-bits"] == rows["--wbits"] == ["FP32", "W8A32"]


def test_train_takes_the_target_bits_once(tmp_path, capsys) -> None:
    args = ["train", "--data", "digits", "--model", "cnn-small", "--steps", "1", "--method", "dnq", "--no-progress"]
    assert cli.main([*args, "--bits", "4,4", "--w-bits", "3", "--out", str(tmp_path / "a")]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main([*args, "--w-bits", "3,4", "--out", str(tmp_path / "b")]) == 2
    assert "--w-bits takes one width" in capsys.readouterr().err
    assert cli.main([*args, "--w-bits", "3", "--a-bits", "5", "--out", str(tmp_path / "c"), "--json"]) == 0
    run = json.loads((tmp_path / "c" / "run.json").read_text())
    method = run["params"]["method"]
    assert (method["w_bits"], method["a_bits"]) == (3, 5)


def test_study_report_only_reports_what_the_folder_ran(tmp_path, capsys):
    """--report-only stops with a clear message where nothing ran, and says so when the protocol
    file given is not the one the folder ran (the report follows the folder)."""
    from workbench.batch.protocol import Protocol

    root = Path(__file__).resolve().parents[1] / "docs" / "study" / "finetune"
    assert cli.main(["study", "finetune", str(root / "quick.yaml"), "--out", str(tmp_path / "none"),
                     "--report-only"]) == 2
    assert "no protocol.json" in capsys.readouterr().err
    ran = tmp_path / "ran"
    ran.mkdir()
    (ran / "protocol.json").write_text(json.dumps(Protocol.from_file(root / "main.yaml").to_dict()))
    cli.main(["study", "finetune", str(root / "quick.yaml"), "--out", str(ran), "--report-only"])
    assert "differs from the protocol file given" in capsys.readouterr().err
