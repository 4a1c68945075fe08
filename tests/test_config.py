"""workbench.config: the one config base of TrainConfig, MethodConfig, NoiseConfig and PTQConfig."""

from __future__ import annotations

import dataclasses

import pytest

from workbench.config import ConfigBase
from workbench.errors import ConfigError
from workbench.noise import NoiseConfig, NoiseSites
from workbench.precondition import MethodConfig
from workbench.ptq import PTQConfig
from workbench.train import TrainConfig

CONFIGS = [TrainConfig(epochs=2, lr=1e-3), MethodConfig(method="dnq", w_bits=3, a_bits=6, exclude=("head",)),
           NoiseConfig(w_bits=None, include=["blocks.*"]), PTQConfig(w_bits=4, a_bits=8, observer="mse")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip_unknown_keys_and_checked_replace(cfg: ConfigBase) -> None:
    d = cfg.to_dict()
    assert type(cfg).from_dict(d) == cfg and list(d) == type(cfg).field_names()
    assert all(not isinstance(v, tuple) for v in d.values())  # JSON types: tuples become lists
    with pytest.raises(ConfigError, match=r"unknown .*\['bogus'\]; valid: .*") as e:
        type(cfg).from_dict({**d, "bogus": 1})
    assert all(name in str(e.value) for name in d)  # the message lists every valid key
    with pytest.raises(ConfigError, match="unknown"):
        cfg.replace(bogus=1)
    name = "w_bits" if "w_bits" in d else "batch_size"
    with pytest.raises(ConfigError):  # replace checks the new value like a new config
        cfg.replace(**{name: 0})
    assert cfg.replace(**{name: d[name]}) == cfg


def test_the_noise_sites_are_declared_and_checked_once_for_both_configs() -> None:
    sites = [f.name for f in dataclasses.fields(NoiseSites)]
    assert len(sites) == 9
    for cls in (MethodConfig, NoiseConfig):
        assert cls.field_names()[: len(sites)] == sites  # inherited, not repeated
        with pytest.raises(ConfigError, match="schedule must be one of"):
            cls(schedule="cosine")
        with pytest.raises(ConfigError, match="ema_momentum must be in"):
            cls(ema_momentum=1.0)
    m = MethodConfig(method="dnq", w_bits=3, a_bits=6, include=("blocks.*",), exclude=("head",), schedule="ramp",
                     ramp_epochs=0.5, ema_momentum=0.8, a_stats_every=2, bank=False, noise_mult_w=0.5, seed=7)
    n = m.noise_config()
    assert {s: getattr(n, s) for s in sites} == {s: getattr(m, s) for s in sites}
    assert (n.noise_mult_w, n.noise_mult_a, n.seed, n.distribution) == (0.5, 1.0, 7, "gaussian")
    # a weight-only method leaves the activations clean, whatever a_bits says
    assert MethodConfig(method="wnoise", w_bits=4, a_bits=4).noise_config().a_bits is None
