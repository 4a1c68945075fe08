"""The one config base: ``from_dict`` (refusing unknown keys, naming the valid ones), ``to_dict``
(plain JSON types) and ``replace`` (checked like a new config), shared by every settings
dataclass (:class:`~workbench.train.TrainConfig`, :class:`~workbench.precondition.MethodConfig`,
:class:`~workbench.noise.NoiseConfig`, :class:`~workbench.ptq.PTQConfig`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Mixin for frozen dataclasses of settings. Subclasses name what their keys are called in
    messages (``KIND``) and check their values in ``__post_init__``, which also runs on
    :meth:`replace`."""

    KIND: ClassVar[str] = "option"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def _check_keys(cls, keys: Any) -> None:
        known = cls.field_names()
        unknown = sorted(set(keys) - set(known))
        if unknown:
            raise ConfigError(f"unknown {cls.KIND}(s) {unknown}; valid: {sorted(known)}")

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from a plain dict (a run's record, a YAML file, CLI flags).

        Raises:
            ConfigError: a key that is not a field (the message lists the valid ones), or a bad value.
        """
        cls._check_keys(d)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON types (tuples as lists), in declaration order."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes``, checked like a new config.

        Raises:
            ConfigError: an unknown field or a bad value.
        """
        self._check_keys(changes)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
                 allow_none: bool = False) -> None:
    """A finite real number ``>= minimum`` (``> minimum`` when ``strict``); bools are refused.

    Raises:
        ConfigError: naming the field and the valid range.
    """
    if value is None and allow_none:
        return
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
