"""Fine-tuning from a trained model (--init CKPT | zoo:NAME), partial epochs, and the model zoo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from workbench import cli, data, models, train, zoo
from workbench.errors import CheckpointError, ConfigError, RunDirError
from workbench.precondition import MethodConfig, create_method

TINY = ["--data", "digits", "--model", "cnn-small", "--model-arg", "width=4", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A finished `workbench train` run folder (digits, a narrow CNN, one epoch)."""
    out = tmp_path_factory.mktemp("parent") / "run"
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    return out


class _FirstStep:
    """Wraps a method and keeps the weights the first training step starts from."""

    def __init__(self, inner):
        self.inner, self.first = inner, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def training_step(self, model, images, labels, ctx):
        if self.first is None:
            self.first = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self.inner.training_step(model, images, labels, ctx)


@pytest.mark.parametrize("method", ["plain", "dnq"])
def test_a_fine_tune_starts_from_exactly_the_parent_weights(parent, method):
    model, ckpt, record = zoo.load_init(parent / "model.pt")
    assert record["sha256"] == zoo.sha256_file(parent / "model.pt") and record["model"] == "cnn-small"
    bundle = data.load("digits")
    spy = _FirstStep(create_method(MethodConfig(method=method)))
    cfg = train.TrainConfig(**models.finetune_recipe("cnn-small"), steps=3, batch_size=64, device="cpu")
    res = train.fit(model, bundle, cfg, spy, progress=False, init=record)
    # dnq perturbs inside the forward pass, so the weights it starts from are the clean parent ones
    assert spy.first.keys() == ckpt["state_dict"].keys()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(spy.first[k], v), k
    assert res.metrics["steps"] == 3 and len(res.history) == 1


def test_init_through_the_cli_records_the_parent_and_uses_the_fine_tune_recipe(parent, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli.main(["train", "--init", str(parent / "model.pt"), "--method", "wnoise", "--bits", "3",
                     "--steps", "5", "--out", str(out), "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 5
    run = json.loads((out / "run.json").read_text())
    init = run["params"]["init"]
    assert init["sha256"] == zoo.sha256_file(parent / "model.pt") and init["file"] == str(parent / "model.pt")
    assert init["metrics"]["test_accuracy"] == json.loads((parent / "metrics.json").read_text())["test_accuracy"]
    # the parent's data and architecture, a tenth of its learning rate, the method's bits
    assert run["params"]["data"]["name"] == "digits" and run["params"]["model"]["name"] == "cnn-small"
    assert run["params"]["train"]["lr"] == pytest.approx(models.default_recipe("cnn-small")["lr"] / 10)
    assert run["params"]["method"]["w_bits"] == 3
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["extra"]["init"]["sha256"] == init["sha256"]
    # a half epoch is half the steps of one
    assert cli.main(["train", "--init", str(parent / "model.pt"), "--epochs", "0.5", "--batch-size", "64",
                     "--out", str(tmp_path / "half"), "--no-progress", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["steps"] == round(0.5 * (len(data.load("digits").train) // 64))
    # ... and warms up over a tenth of itself, as the study's members do (their recorded command
    # reproduces them)
    half_run = json.loads((tmp_path / "half" / "run.json").read_text())
    assert half_run["params"]["train"]["warmup_epochs"] == pytest.approx(0.05)


def test_init_refuses_what_cannot_be_a_fine_tune(parent, tmp_path, capsys):
    ck = str(parent / "model.pt")
    for argv, says in ((["--model", "vit-micro"], "leave --model out"), (["--model-arg", "width=8"], "architecture"),
                       (["--steps", "0"], "steps"), (["--data", "fashion-mnist-mini"], "leave --data out")):
        assert cli.main(["train", "--init", ck, *argv, "--out", str(tmp_path / "x")]) == 2, argv
        assert says in capsys.readouterr().err
    assert cli.main(["train", "--init", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")]) == 5
    assert "zoo:NAME" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_partial_epochs_and_steps_in_the_config(small):
    with pytest.raises(ConfigError, match="epochs must be a number > 0"):
        train.TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="steps must be a whole number"):
        train.TrainConfig(steps=0)
    cfg = train.TrainConfig(epochs=1.5, batch_size=64, lr=3e-3, warmup_epochs=0.2, augment=False, device="cpu")
    m = models.create("cnn-small", num_classes=10, in_chans=1, img_size=28, width=4)
    res = train.fit(m, small, cfg, progress=False)
    per_epoch = len(small.train) // 64
    assert res.metrics["steps"] == round(1.5 * per_epoch) and [r["epoch"] for r in res.history] == [1, 2]
    assert math.isclose(res.history[-1]["lr"], cfg.min_lr, rel_tol=1e-6)  # the schedule ends where training does


def test_zoo_publish_load_and_checksum(parent, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(zoo.ZOO_DIR_ENV, str(tmp_path / "zoo"))
    with pytest.raises(CheckpointError, match="workbench zoo build cnn-small-mini"):
        zoo.load("cnn-small-mini")
    rec = zoo.publish("cnn-small-mini", parent)
    assert rec["sha256"] == zoo.sha256_file(parent / "model.pt") and rec["model"] == "cnn-small"
    with pytest.raises(RunDirError, match="overwrite"):
        zoo.publish("cnn-small-mini", parent)
    model, ckpt = zoo.load("cnn-small-mini")
    assert ckpt["metrics"]["test_accuracy"] == rec["metrics"]["test_accuracy"]
    assert {r["name"]: r["available"] for r in zoo.list_entries()}["cnn-small-mini"] is True
    # fine-tuning from the zoo name records it as the source
    assert cli.main(["train", "--init", "zoo:cnn-small-mini", "--steps", "2", "--out", str(tmp_path / "ft"),
                     "--no-progress"]) == 0
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["params"]["init"]["source"] == "zoo:cnn-small-mini"
    capsys.readouterr()
    # one changed byte: refused with what to do, by the API and by the CLI
    f = tmp_path / "zoo" / "cnn-small-mini.pt"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged or was replaced"):
        zoo.load("cnn-small-mini")
    assert cli.main(["train", "--init", "zoo:cnn-small-mini", "--out", str(tmp_path / "ft2")]) == 5
    err = capsys.readouterr().err.strip()
    assert "sha256" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert cli.main(["zoo", "info", "nope"]) == 2


def test_notebook_helpers_fine_tune_per_seed_and_quantize_the_parent_as_it_is(parent):
    from workbench import nbtools as nbt
    from workbench import ptq

    bundle = nbt.load_data("digits", seed=0, limit_train=512, limit_test=200, n_calib=64)
    init = str(parent / "model.pt")
    trained = nbt.train_seeds(["plain", "dnq"], bundle, seeds=[0, 1], init=init, model="ignored", epochs=0.5,
                              device="cpu", noise_bits="W3A6", batch_size=64, progress=False)
    assert list(trained) == ["plain s0", "dnq s0", "plain s1", "dnq s1"]
    # the noise target is its own setting (PTQ's bits are chosen later)
    assert (trained["dnq s1"].method_config["w_bits"], trained["dnq s1"].method_config["a_bits"]) == (3, 6)
    assert [(t.arm, t.seed) for t in trained.values()] == [("plain", 0), ("dnq", 0), ("plain", 1), ("dnq", 1)]
    # epochs=0: no training, the parent's own weights
    only = nbt.train_methods(["plain"], bundle, init=init, model="ignored", epochs=0)
    assert list(only) == ["parent"]
    saved = torch.load(parent / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in only["parent"].model.state_dict().items())
    with pytest.raises(ConfigError, match="epochs=0 trains nothing"):
        nbt.train_methods(["plain"], bundle, model="cnn-small", epochs=0)
    other = nbt.load_data("fashion-mnist-mini", limit_train=64, limit_test=64, n_calib=16)
    with pytest.raises(ConfigError, match="data='digits'.*init=None"):  # a digits parent on 28 px images
        nbt.train_methods(["plain"], other, init=init, model="ignored", epochs=1)
    rows = nbt.ptq_rows({**only, **trained}, [ptq.PTQConfig(w_bits=4, a_bits=4, n_calib=64)], bundle, 64)
    assert {(r["arm"], r["seed"]) for r in rows} >= {("parent", None), ("plain", 0), ("dnq", 1)}
    table = nbt.seed_summary(rows)
    assert {(r["config"], r["arm"], r["n"]) for r in table} == {(c, a, 2) for c in ("FP32", "W4A4")
                                                               for a in ("plain", "dnq")}
    assert all("verdict" in r for r in table if r["arm"] == "dnq")
