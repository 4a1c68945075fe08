"""The notebook profiles: ``quick`` (every notebook's own defaults, tiny on purpose) and ``full``
(what ``workbench run --profile full`` passes on top). A light module: no torch, so the batch
layer reads it without loading the notebooks' toolbox."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

#: The quick profile: the defaults of every notebook's ``parameters`` cell. Tiny on purpose:
#: the whole notebook set runs in a few minutes on 2 CPU cores (and inside the test suite).
QUICK_PROFILE: dict[str, Any] = {
    "data": "fashion-mnist-mini",
    "model": "vit-micro",
    "model_args": {},  # the model's own architecture; a fine-tune keeps its parent's anyway
    # a converged parent (84 % on fashion-mnist-mini): notebooks fine-tune it rather than train
    # from scratch, since the second-order argument needs a model near a minimum
    "init": "zoo:vit-micro-mini-s0",
    "seed": 0,
    "device": "cpu",
    "limit_train": 2000,  # training images used (0 = all)
    "limit_test": 500,  # test images used (0 = all)
    "n_calib": 128,  # PTQ calibration images (drawn from the training images)
    "batch_size": 128,
}

#: The full profile: what ``workbench run --profile full`` passes on top of the defaults.
FULL_PROFILE: dict[str, Any] = {
    "model_args": {},
    "epochs": 3,  # fine-tune epochs (06_study_member trains from scratch: give it epochs=None, its recipe)
    "device": "auto",
    "limit_train": 0,
    "limit_test": 0,
    "n_calib": 512,
}

PROFILES: dict[str, dict[str, Any]] = {"quick": {}, "full": FULL_PROFILE}


def quick_profile(**overrides: Any) -> dict[str, Any]:
    """The quick-profile parameter values, with ``overrides`` applied (introduced in 00_quickstart).

    Raises:
        ConfigError: an override names no quick-profile parameter.
    """
    unknown = sorted(set(overrides) - set(QUICK_PROFILE))
    if unknown:
        raise ConfigError(f"unknown quick-profile parameter(s) {unknown}; valid: {sorted(QUICK_PROFILE)}")
    return {**QUICK_PROFILE, **overrides}
