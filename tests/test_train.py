import json
import math
import signal

import pytest
import torch

from workbench import checkpoint, models, train
from workbench.errors import CheckpointError, ConfigError, RunDirError, TrainingDivergedError
from workbench.precondition import MethodConfig, create_method
from workbench.runinfo import prepare_run_dir, set_seed
from workbench.train_method import TrainMethod

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
    """Raises KeyboardInterrupt at the start of step ``at`` (before it changes anything)."""

    def __init__(self, at):
        self.at, self.n = at, 0

    def training_step(self, model, images, labels, ctx):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return super().training_step(model, images, labels, ctx)


class _CtrlC:
    """Wraps a method and sends this process a real SIGINT (``times`` of them) during step ``at``,
    like a user pressing Ctrl-C in the middle of a step."""

    def __init__(self, inner, at, times=1):
        self.inner, self.at, self.times, self.n = inner, at, times, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def training_step(self, model, images, labels, ctx):
        self.n += 1
        if self.n == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
        return self.inner.training_step(model, images, labels, ctx)


RESUME_METHODS = {
    "plain": {"method": "plain"},
    "dnq": {"method": "dnq", "w_bits": 4, "a_bits": 4, "a_stats_every": 3, "schedule": "ramp", "ramp_epochs": 1.5},
    "swa": {"method": "swa", "swa_epochs": 2},
    # the learned steps and zero points, and whether each input quantizer has its start range
    "qat": {"method": "qat", "w_bits": 4, "a_bits": 4},
}
# cnn-small keeps its dropout (0.1) and the images are augmented: every random stream is in play
RESUME_CFG = {**FAST, "augment": True}


def _assert_same_run(a, b, model_a, model_b):
    assert [r["epoch"] for r in a.history] == [r["epoch"] for r in b.history]
    for ra, rb in zip(a.history, b.history):
        for key in ("train_loss", "test_loss", "test_accuracy", "lr"):
            assert ra[key] == rb[key], (ra["epoch"], key, ra[key], rb[key])
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]
    assert a.metrics["test_loss"] == b.metrics["test_loss"]
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", sorted(RESUME_METHODS))
def test_ctrl_c_then_resume_is_bit_identical_to_an_uninterrupted_run(small, tmp_path, name):
    cfg = train.TrainConfig(**RESUME_CFG)
    ref_model = _model(2, width=8)
    ref = train.fit(ref_model, small, cfg, create_method(MethodConfig(**RESUME_METHODS[name])), progress=False)
    out = prepare_run_dir(tmp_path / "r")
    inner = create_method(MethodConfig(**RESUME_METHODS[name]))
    # the handler the process started with: Python's default, or SIG_IGN when a shell without job
    # control started it in the background (either way it must be the one put back)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C during step 49 = epoch 2, batch 9: it stops after it
        train.fit(_model(2, width=8), small, cfg, _CtrlC(inner, at=49), out_dir=out, progress=False)
    last = checkpoint.load_checkpoint(out / "last.pt")
    assert last["progress"] == {"epoch": 1, "step_in_epoch": 9, "interrupted": True}
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    model = _model(99, width=8)  # other initial weights: everything must come from last.pt
    res = train.fit(model, small, cfg, create_method(MethodConfig(**RESUME_METHODS[name])),
                    out_dir=prepare_run_dir(out, resume=True), resume=True, progress=False)
    _assert_same_run(res, ref, model, ref_model)


def test_resume_at_an_exception_raised_before_a_step(small, tmp_path):
    # a KeyboardInterrupt raised by code (not the signal) at a step boundary also resumes exactly
    cfg = train.TrainConfig(**RESUME_CFG)
    ref_model = _model(3, width=8)
    ref = train.fit(ref_model, small, cfg, progress=False)
    out = prepare_run_dir(tmp_path / "r")
    with pytest.raises(KeyboardInterrupt):
        train.fit(_model(3, width=8), small, cfg, _Interrupt(at=45), out_dir=out, progress=False)
    assert checkpoint.load_checkpoint(out / "last.pt")["progress"]["step_in_epoch"] == 4
    model = _model(3, width=8)
    res = train.fit(model, small, cfg, out_dir=prepare_run_dir(out, resume=True), resume=True, progress=False)
    _assert_same_run(res, ref, model, ref_model)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_consistent_checkpoint(small, tmp_path):
    cfg = train.TrainConfig(**RESUME_CFG)
    out = prepare_run_dir(tmp_path / "r")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train.fit(_model(2, width=8), small, cfg, _CtrlC(TrainMethod(), at=45, times=2), out_dir=out,
                  progress=False)
    last = checkpoint.load_checkpoint(out / "last.pt")
    # the torn step is not saved: last.pt is still the end of epoch 1
    assert last["progress"] == {"epoch": 1, "step_in_epoch": 0, "interrupted": False}
    assert [r["epoch"] for r in last["extra"]["history"]] == [1]
    assert signal.getsignal(signal.SIGINT) is before


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
