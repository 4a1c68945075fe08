"""Shared fixtures: the embedded dataset and small slices of it for fast tests."""

from __future__ import annotations

import os

import pytest
import torch

from workbench import data


@pytest.fixture(scope="session")
def mini() -> data.DataBundle:
    """The embedded fashion-mnist-mini dataset (loads in well under a second)."""
    return data.load("fashion-mnist-mini", seed=0, n_calib=256)


@pytest.fixture(scope="session")
def small(mini: data.DataBundle) -> data.DataBundle:
    """1,280 training / 400 test images of fashion-mnist-mini: enough to beat chance fast."""
    g = torch.Generator().manual_seed(0)
    tr = mini.train.subset(torch.randperm(len(mini.train), generator=g)[:1280])
    te = mini.test.subset(torch.randperm(len(mini.test), generator=g)[:400])
    calib = tr.subset(torch.arange(128))
    return data.DataBundle(mini.info, tr, te, calib, tr.subset(torch.arange(0)), seed=0,
                           params={"name": "fashion-mnist-mini", "subset": "tests"})


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors on shared cores: one torch thread avoids oversubscription stalls (use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ptq_cli(tmp_path, capsys):
    """Run ``workbench ptq ARGS --json`` on an untrained cnn-small checkpoint; return the rows."""
    import argparse
    import json

    from workbench import models
    from workbench.checkpoint import save_checkpoint
    from workbench.cli.ptq import add_ptq_parser, run_ptq_command

    bundle = data.load("fashion-mnist-mini")
    model = models.create("cnn-small", num_classes=bundle.info.num_classes, in_chans=bundle.info.channels,
                          img_size=bundle.info.image_size)
    path = save_checkpoint(tmp_path / "m.pt", model, data_info=bundle.info.to_dict())

    def run(*args: str) -> list[dict]:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        add_ptq_parser(sub, lambda p: p.add_argument("--json", action="store_true"))
        assert run_ptq_command(parser.parse_args(["ptq", str(path), *args, "--json"])) == 0
        return json.loads(capsys.readouterr().out)

    run.path = path
    return run


# -- running the suite on two workers (`make test`: pytest-xdist, ``--dist loadfile``) --------------
# loadfile keeps a notebook's cells in order on one worker (each needs the ones before it) and a test
# module whole (its module fixtures are built once); --no-loadscope-reorder hands the files out in
# collection order, notebooks first, so tests/test_quickstart_results.py finds nbval's finished run
# of notebook 00 (were it still running, that test would run the notebook itself: slower, still right).


def pytest_configure(config) -> None:
    # Two workers on two cores: one torch thread each (the notebook kernels, papermill runs and study
    # jobs they start inherit OMP_NUM_THREADS) instead of four threads fighting over two cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
