import json
import math

import pytest
import torch

from workbench import checkpoint, models, train
from workbench.errors import CheckpointError, ConfigError, RunDirError, TrainingDivergedError
from workbench.methods import TrainMethod
from workbench.runinfo import prepare_run_dir, set_seed

FAST = dict(epochs=2, batch_size=32, lr=3e-3, warmup_epochs=0.2, augment=False, eval_batch_size=500, device="cpu")


def _model(seed=0, width=16):
    set_seed(seed)
    return models.create("cnn-small", num_classes=10, in_chans=1, img_size=28, width=width)


def test_short_run_beats_chance_and_writes_its_record(small, tmp_path):
    out = prepare_run_dir(tmp_path / "run")
    res = train.fit(_model(), small, train.TrainConfig(**FAST), out_dir=out, progress=False)
    assert res.metrics["test_accuracy"] > 40  # chance is 10 %
    assert [r["epoch"] for r in res.history] == [1, 2]
    assert all(r["epoch_time"] > 0 and math.isfinite(r["train_loss"]) for r in res.history)
    for name in ("model.pt", "last.pt", "history.json", "history.csv", "metrics.json", "run.json"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["params"]["train"]["epochs"] == 2 and "torch" in run["versions"] and "commit" in run["git"]
    # the saved model reproduces the reported accuracy
    model, ckpt = checkpoint.load_model(out / "model.pt")
    ev = train.evaluate_split(model, small, "test")
    assert ev["accuracy"] == pytest.approx(res.metrics["test_accuracy"])
    assert ckpt["metrics"]["test_accuracy"] == res.metrics["test_accuracy"]


def test_same_seed_same_result(small):
    cfg = train.TrainConfig(**{**FAST, "epochs": 1})
    a = train.fit(_model(1), small, cfg, progress=False)
    b = train.fit(_model(1), small, cfg, progress=False)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.metrics["test_loss"] == b.metrics["test_loss"]


def test_checkpoint_round_trip_and_mismatch_refusal(small, tmp_path):
    m = _model()
    path = checkpoint.save_checkpoint(tmp_path / "c.pt", m, data_info=small.info.to_dict(), metrics={"x": 1})
    m2, ckpt = checkpoint.load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert ckpt["metrics"] == {"x": 1} and ckpt["data_info"]["name"] == "fashion-mnist-mini"
    other = models.create("cnn-small", num_classes=5, in_chans=1, img_size=28, width=16)
    with pytest.raises(CheckpointError, match="10 classes but the model has 5"):
        checkpoint.check_compatible(ckpt, other)
    vit = models.create("vit-micro")
    with pytest.raises(CheckpointError, match="is for model 'cnn-small'"):
        checkpoint.check_compatible(ckpt, vit)
    wider = models.create("cnn-small", num_classes=10, in_chans=1, img_size=28, width=24)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        checkpoint.check_compatible(ckpt, wider)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a workbench checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a workbench checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": checkpoint.FORMAT, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        checkpoint.load_checkpoint(tmp_path / "evil.pt")


class _Explode(TrainMethod):
    def training_step(self, model, images, labels, ctx):
        loss = super().training_step(model, images, labels, ctx)
        self.n = getattr(self, "n", 0) + 1
        return loss * float("nan") if self.n == 3 else loss


def test_nan_loss_stops_with_the_step(small):
    with pytest.raises(TrainingDivergedError, match="step 3") as e:
        train.fit(_model(), small, train.TrainConfig(**FAST), _Explode(), progress=False)
    assert e.value.step == 2 and e.value.epoch == 0


class _Interrupt(TrainMethod):
    def __init__(self, at):
        self.at, self.n = at, 0

    def training_step(self, model, images, labels, ctx):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return super().training_step(model, images, labels, ctx)


def test_ctrl_c_saves_and_resume_matches_uninterrupted_run(small, tmp_path):
    cfg = train.TrainConfig(**FAST)
    ref = train.fit(_model(2), small, cfg, progress=False)
    out = prepare_run_dir(tmp_path / "r")
    with pytest.raises(KeyboardInterrupt):
        train.fit(_model(2), small, cfg, _Interrupt(at=49), out_dir=out, progress=False)   # epoch 2, batch 9
    last = checkpoint.load_checkpoint(out / "last.pt")
    assert last["progress"] == {"epoch": 1, "step_in_epoch": 8, "interrupted": True}
    res = train.fit(_model(99), small, cfg, out_dir=prepare_run_dir(out, resume=True), resume=True, progress=False)
    assert [r["epoch"] for r in res.history] == [1, 2]
    # same data order and weights: the resumed run lands where the uninterrupted one did
    assert res.metrics["test_accuracy"] == pytest.approx(ref.metrics["test_accuracy"], abs=1.0)
    assert res.history[0]["test_loss"] == pytest.approx(ref.history[0]["test_loss"], rel=1e-5)


def test_resume_refuses_a_different_recipe(small, tmp_path):
    out = prepare_run_dir(tmp_path / "r")
    with pytest.raises(KeyboardInterrupt):
        train.fit(_model(), small, train.TrainConfig(**FAST), _Interrupt(at=3), out_dir=out, progress=False)
    with pytest.raises(CheckpointError, match="different recipe"):
        train.fit(_model(), small, train.TrainConfig(**{**FAST, "lr": 1e-2}), out_dir=out, resume=True, progress=False)


def test_run_dir_is_never_overwritten_silently(tmp_path):
    d = tmp_path / "run"
    prepare_run_dir(d)
    (d / "model.pt").write_text("x")
    with pytest.raises(RunDirError, match="already exists"):
        prepare_run_dir(d)
    assert prepare_run_dir(d, overwrite=True) == d
    with pytest.raises(RunDirError, match="no interrupted run"):
        prepare_run_dir(tmp_path / "other", resume=True)


def test_config_validation_and_lr_schedule():
    with pytest.raises(ConfigError, match="optimizer"):
        train.TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="unknown training option"):
        train.TrainConfig.from_dict({"epoch": 3})
    f = [train.lr_factor(s, 100, 10, 0.0) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_weight_decay_policy_skips_norms_biases_and_pos_embed():
    m = models.create("vit-micro")
    decay, no_decay = train.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert "pos_embed" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
