"""Shared fixtures: the embedded dataset and small slices of it for fast tests."""

from __future__ import annotations

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
