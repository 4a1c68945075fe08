"""Several processes (2 CPU processes, gloo) give what one process gives.

One ``torch.multiprocessing.spawn`` of two workers (a module fixture) runs every multi-process
case and saves what it saw; the tests compare that with the same computation in one process.
The CLI case goes through the real ``torchrun`` launcher. The machine has 2 cores: each worker
uses one thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench import cli, data, distributed, models, nbtools, train
from workbench import flatness as fl
from workbench.errors import ConfigError
from workbench.precondition import MethodConfig, NoiseMethod, create_method
from workbench.runinfo import prepare_run_dir, set_seed

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# SGD rather than AdamW: Adam's first steps move every weight by +-lr whatever the gradient's size,
# which turns float rounding (summation order differs between 1 and 2 processes) into lr-sized gaps.
CFG = dict(epochs=2, batch_size=32, optimizer="sgd", lr=0.01, warmup_epochs=0.25, augment=True,
           eval_batch_size=100, device="cpu")
NOISE = dict(method="dnq", w_bits=4, a_bits=8, seed=5, a_stats_every=2)
#: deterministic methods that must give what one process gives: SAM (both passes all-reduced), SWA
EXACT = {"sam": dict(method="sam", rho=0.05), "swa": dict(method="swa", swa_epochs=2)}
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundle() -> data.DataBundle:
    return nbtools.load_data("fashion-mnist-mini", limit_train=128, limit_test=100)


def _model(info: data.DataInfo, drop_rate: float = 0.0) -> torch.nn.Module:
    set_seed(0)
    # BatchNorm; no dropout where one process is the reference (its dropout masks differ)
    return models.create("cnn-small", info, width=8, drop_rate=drop_rate)


class _Spy(NoiseMethod):
    """dnq that records, at the end of each epoch, what the noise handle holds."""

    def on_epoch_end(self, model, epoch):
        h = self.handle
        std = h.noise_std()
        self.seen = {"w_sigma": [v["w"].clone() for v in std.values()],
                     "ranges": [(s.xmin.clone(), s.xmax.clone()) for s in h._act],
                     "seed": h.config.seed, "bank": next(iter(h._bank.banks.values()))[:64].clone()}


class _CtrlCOnRank0:
    """Wraps a method; rank 0 alone gets a real SIGINT during step ``at`` (the ranks must agree to stop)."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.n = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def training_step(self, model, images, labels, ctx):
        self.n += 1
        if self.n == self.at and distributed.get_rank() == 0:
            signal.raise_signal(signal.SIGINT)
        return self.inner.training_step(model, images, labels, ctx)


#: resumed on two processes with dropout on: each rank's dropout and noise streams must come back
RESUME = {"plain": dict(method="plain"), "dnq": dict(NOISE)}


def _hessian_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    set_seed(3)
    model = models.create("cnn-small", num_classes=10, in_chans=1, img_size=28, width=4).double()
    b = data.load("fashion-mnist-mini", n_calib=0)
    x, y = next(data.batches(b.train, b.info, 20, shuffle=True, seed=1))
    return model, x.double(), y


def _hessian_measures(model, batches) -> dict:
    out = {}
    for method in ("fwd", "dbl"):  # both products (dbl reuses its graph where a rank holds one batch)
        with fl.LossHessian(model, batches, method=method) as H:
            v = torch.randn(H.numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            out[f"hvp_{method}"] = H.hvp(v)
    with fl.LossHessian(model, batches) as H:  # auto: the ranks must pick the same product
        loss, acc = H.loss(accuracy=True)
        return {**out, "gradient": H.gradient(), "loss": loss, "accuracy": acc,
                "trace": fl.hutchinson_trace(H, min_probes=3, max_probes=3,
                                             generator=torch.Generator().manual_seed(0)).samples,
                "eig": fl.top_eigenvalues(H, k=1, max_iter=8, generator=torch.Generator().manual_seed(2)).eigenvalues}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout=120)  # a failing peer cannot hang the suite for long
    res: dict = {}
    try:
        bundle, cfg = _bundle(), train.TrainConfig(**CFG)
        # (1) plain training, uninterrupted
        model = _model(bundle.info)
        r = train.fit(model, bundle, cfg, progress=False)
        res["plain"] = {"state": model.state_dict(), "history": r.history, "metrics": r.metrics}
        # Ctrl-C on rank 0 during step 6 of 8, then resumed by both ranks from rank 0's last.pt;
        # compared with the same run uninterrupted; record who writes
        for name, mc in RESUME.items():
            model = _model(bundle.info, drop_rate=0.2)
            r = train.fit(model, bundle, cfg, create_method(MethodConfig(**mc)), progress=False)
            res[f"{name}_ref"] = {"state": model.state_dict(), "history": r.history}
            run = Path(distributed.call_on_main(lambda n=name: prepare_run_dir(Path(out) / f"run-{n}")))
            writes: list[str] = []
            saved = train.save_checkpoint, train.write_json, train.write_csv

            def spy(fn, writes=writes):
                def recorded(path, *args, **kwargs):
                    writes.append(Path(path).name)
                    return fn(path, *args, **kwargs)
                return recorded

            train.save_checkpoint, train.write_json, train.write_csv = (spy(f) for f in saved)
            try:
                try:
                    train.fit(_model(bundle.info, drop_rate=0.2), bundle, cfg,
                              _CtrlCOnRank0(create_method(MethodConfig(**mc)), at=6), out_dir=run, progress=False)
                except KeyboardInterrupt:
                    res[f"{name}_stopped"] = True
                distributed.barrier()
                if rank == 0:
                    res[f"{name}_stopped_at"] = torch.load(Path(run) / "last.pt", weights_only=True)["progress"]
                model = _model(bundle.info, drop_rate=0.2)
                with torch.no_grad():  # other weights: everything must come from last.pt
                    for p in model.parameters():
                        p.add_(1.0)
                r = train.fit(model, bundle, cfg, create_method(MethodConfig(**mc)), out_dir=run, resume=True,
                              progress=False)
            finally:
                train.save_checkpoint, train.write_json, train.write_csv = saved
            res[f"{name}_resumed"] = {"state": model.state_dict(), "history": r.history, "writes": writes}
        # dnq: per-rank noise, shared weights, weight-noise scales and activation ranges
        method = _Spy(MethodConfig(**NOISE))
        r = train.fit(_model(bundle.info), bundle, train.TrainConfig(**{**CFG, "epochs": 1}), method,
                      progress=False)
        res["dnq"] = {**method.seen, "metrics": r.metrics}
        for name, mc in EXACT.items():
            model = _model(bundle.info)
            train.fit(model, bundle, cfg, create_method(MethodConfig(**mc)), progress=False)
            res[name] = model.state_dict()
        # a global batch that does not split evenly
        try:
            train.fit(_model(bundle.info), bundle, train.TrainConfig(**{**CFG, "batch_size": 31}), progress=False)
        except ConfigError as e:
            res["indivisible"] = str(e)
        # (3) the Hessian over the union of the ranks' (unequal) data
        model, x, y = _hessian_case()
        mine = [(x[:8], y[:8]), (x[8:12], y[8:12])] if rank == 0 else [(x[12:], y[12:])]
        res["hessian"] = _hessian_measures(model, mine)
        with fl.LossHessian(model, mine) as H:
            try:
                H.hvp(torch.randn(H.numel, generator=torch.Generator().manual_seed(rank), dtype=torch.float64))
            except ConfigError as e:
                res["mismatch"] = str(e)
    finally:
        torch.save(res, Path(out) / f"rank{rank}.pt")
        distributed.cleanup()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict:
    """What each of the two workers saw ("ranks"), and their shared folder ("out")."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return {"ranks": [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], "out": out}


@pytest.fixture
def ranks(spawned) -> list[dict]:
    return spawned["ranks"]


@pytest.fixture
def one_thread():
    """The one-process references on one thread, like each worker (tiny models; steadier under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rel_diff(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over all floating-point entries of two state dicts (integers must be equal)."""
    assert all(torch.equal(v, b[k]) for k, v in a.items() if not v.is_floating_point())
    va = torch.cat([v.flatten() for v in a.values() if v.is_floating_point()])
    vb = torch.cat([b[k].flatten() for k, v in a.items() if v.is_floating_point()])
    return float((va - vb).norm() / vb.norm())


def test_two_processes_train_the_model_one_process_trains(ranks, one_thread):
    bundle = _bundle()
    model = _model(bundle.info)
    one = train.fit(model, bundle, train.TrainConfig(**CFG), progress=False)
    two = ranks[0]["plain"]
    # same global batches (sharded, augmented alike), averaged gradients, global-batch BatchNorm:
    # only float rounding separates them (measured ~1e-5; per-rank BatchNorm statistics give ~0.2)
    assert _rel_diff(two["state"], model.state_dict()) < 1e-3
    for a, b in zip(two["history"], one.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    assert two["metrics"]["test_accuracy"] == pytest.approx(one.metrics["test_accuracy"], abs=1.01)
    assert two["metrics"]["world_size"] == 2 and "world_size" not in one.metrics
    # every rank ends with the same weights and reports the same (reduced) metrics
    assert all(torch.equal(v, ranks[1]["plain"]["state"][k]) for k, v in two["state"].items())
    assert two["metrics"]["test_loss"] == ranks[1]["plain"]["metrics"]["test_loss"]


@pytest.mark.parametrize("name", sorted(EXACT))
def test_sam_and_swa_on_two_processes_are_the_one_process_methods(ranks, one_thread, name):
    bundle = _bundle()
    model = _model(bundle.info)
    train.fit(model, bundle, train.TrainConfig(**CFG), create_method(MethodConfig(**EXACT[name])), progress=False)
    assert _rel_diff(ranks[0][name], model.state_dict()) < 1e-3
    assert all(torch.equal(v, ranks[1][name][k]) for k, v in ranks[0][name].items())


@pytest.mark.parametrize("name", sorted(RESUME))
def test_resume_on_two_processes_is_bit_identical_and_only_rank_0_writes(ranks, spawned, name):
    out = spawned["out"]
    for rank in ranks:  # both ranks stopped (only rank 0 got the signal) and resumed to the same end
        assert rank.get(f"{name}_stopped")
        resumed, ref = rank[f"{name}_resumed"], rank[f"{name}_ref"]
        for k, v in ref["state"].items():
            assert torch.equal(resumed["state"][k], v), k
        assert [r["epoch"] for r in resumed["history"]] == [1, 2]
        for a, b in zip(resumed["history"], ref["history"]):
            assert (a["train_loss"], a["test_loss"], a["test_accuracy"]) == \
                (b["train_loss"], b["test_loss"], b["test_accuracy"])
    # 4 global batches an epoch: the ranks agreed to stop after step 6 = epoch 2, batch 2
    assert ranks[0][f"{name}_stopped_at"] == {"epoch": 1, "step_in_epoch": 2, "interrupted": True}
    assert ranks[1][f"{name}_resumed"]["writes"] == []
    assert {"last.pt", "model.pt", "run.json", "history.json", "metrics.json"} <= \
        set(ranks[0][f"{name}_resumed"]["writes"])
    run = json.loads((out / f"run-{name}" / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch_size": 16}


def test_noise_is_per_rank_but_scales_and_ranges_are_shared(ranks, one_thread):
    a, b = ranks[0]["dnq"], ranks[1]["dnq"]
    assert (a["seed"], b["seed"]) == (NOISE["seed"], NOISE["seed"] + 1)  # seed + rank
    assert not torch.equal(a["bank"], b["bank"])
    assert all(torch.equal(x, y) for x, y in zip(a["w_sigma"], b["w_sigma"]))  # weights are identical
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a["ranges"], b["ranges"]))
    # the first layer sees the images, unaffected by noise: its synced range is the one-process EMA
    bundle = _bundle()
    one = _Spy(MethodConfig(**NOISE))
    train.fit(_model(bundle.info), bundle, train.TrainConfig(**{**CFG, "epochs": 1}), one, progress=False)
    assert torch.allclose(torch.stack(a["ranges"][0]), torch.stack(one.seen["ranges"][0]), rtol=1e-6)
    assert "divisible by the number of processes (2)" in ranks[0]["indivisible"]


def test_hessian_over_two_processes_is_the_hessian_of_the_union(ranks, one_thread):
    model, x, y = _hessian_case()
    one = _hessian_measures(model, [(x, y)])
    for r in range(WORLD):
        two = ranks[r]["hessian"]
        for method in ("fwd", "dbl"):
            assert torch.allclose(two[f"hvp_{method}"], one["hvp_fwd"], rtol=1e-9, atol=1e-12), method
        assert torch.allclose(two["gradient"], one["gradient"], rtol=1e-9, atol=1e-12)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-12)
        assert two["accuracy"] == pytest.approx(one["accuracy"])
        assert two["trace"] == pytest.approx(one["trace"], rel=1e-9)
        assert two["eig"] == pytest.approx(one["eig"], rel=1e-9)
        assert "different vectors" in ranks[r]["mismatch"]


def test_torchrun_trains_dnq_through_the_cli(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "workbench.cli", "train", "--data", "digits",
           "--model", "cnn-small", "--model-arg", "width=8", "--epochs", "1", "--batch-size", "64",
           "--method", "dnq", "--device", "cpu", "--out", str(out), "--no-progress", "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)  # one JSON document: rank 1 printed nothing
    assert result["world_size"] == 2 and result["test_accuracy"] > 10
    assert sorted(f.name for f in out.iterdir()) == ["history.csv", "history.json", "last.pt", "metrics.json",
                                                      "model.pt", "run.json"]
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert p.stderr.count("DistributedDataParallel over 2 processes") == 1  # rank 0 logs


def test_batches_shards_are_the_single_process_batch(mini):
    kw = dict(shuffle=True, augment=True, seed=3, epoch=1, drop_last=True)
    one = list(data.batches(mini.train, mini.info, 64, limit=640, **kw))
    parts = [list(data.batches(mini.train, mini.info, 64, limit=640, rank=r, world_size=3, **kw)) for r in range(3)]
    assert len(one) == 10 and all(len(p) == 10 for p in parts)
    for i, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    # resumable per shard; a last batch smaller than the world skips the empty shards
    assert torch.equal(next(data.batches(mini.train, mini.info, 64, limit=640, start_batch=4, rank=1,
                                         world_size=3, **kw))[0], parts[1][4][0])
    tail = [list(data.batches(mini.train, mini.info, 4, limit=6, rank=r, world_size=3)) for r in range(3)]
    assert [[len(b[1]) for b in t] for t in tail] == [[1], [1, 1], [2, 1]]
    with pytest.raises(ConfigError, match="does not fit"):
        next(data.batches(mini.train, mini.info, 64, rank=2, world_size=2))


def test_one_process_is_untouched_and_bad_environments_say_what_is_wrong(monkeypatch, tmp_path, capsys):
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") is False and not distributed.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce_values([1.5, 2], "max") == [1.5, 2.0]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="not an integer"):
        distributed.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    # torchrun's variables missing: the CLI stops before touching the output folder
    assert cli.main(["train", "--data", "digits", "--model", "cnn-small", "--out", str(tmp_path / "x")]) == 2
    assert "MASTER_ADDR, MASTER_PORT are not" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # nobody listens at the master address
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(ConfigError, match="could not be initialized"):
        distributed.init_from_env("cpu", timeout=1)
    assert not distributed.is_initialized()
