"""A tiny registry shared by datasets, models, methods and observers.

One shape everywhere: ``register`` (usable as a decorator), ``get`` that raises an
:class:`~workbench.errors.UnknownNameError` listing what exists and the closest match,
and ``names``.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually factories) of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, help: str = "") -> Callable[[T], T] | T:  # noqa: A002
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator."""

        def _add(o: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            doc = help or (getattr(o, "__doc__", None) or "").strip().splitlines()
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        valid = ", ".join(self.names()) or "(none registered)"
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind} names: {valid}."

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
