"""One generic registry for everything chosen by name: mask methods, metrics, conditions, catalog formats.

A registry maps a name to an entry (a function, or a small record holding one)::

    METHODS: Registry[Method] = Registry("mask method")

    @METHODS.register("wanda")          # decorator: registers the function itself
    def wanda(...): ...

    METHODS.add("wanda", Method(...))   # or an entry built by hand

    METHODS["wanda"]      # -> the entry; an unknown name raises UnknownName (a KeyError and a ValueError)
                          #    "unknown mask method 'wandda' (did you mean 'wanda'?); available: ..."

Each name is declared once: registering a name twice raises, so two modules can never
silently replace each other's entries. Iteration follows registration order.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A name no entry is registered under; the message lists what is available."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def suggest(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or ``""``."""
    near = difflib.get_close_matches(str(word), list(known), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in errors: "mask method", "metric", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name already taken raises ValueError."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: ``@REGISTRY.register("name")`` registers what it decorates."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def remove(self, name: str) -> T:
        """Take an entry out again (a plug-in unloading, a test cleaning up); unknown names raise UnknownName."""
        entry = self[name]
        del self._entries[name]
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(self.unknown_message(name)) from None

    get = __getitem__

    def unknown_message(self, name: object) -> str:
        return f"unknown {self.kind} {name!r}{suggest(str(name), self._entries)}; available: {', '.join(self._entries)}"

    def check(self, names: Iterable[str]) -> list[str]:
        """One message per unknown name (empty when every name is registered)."""
        return [self.unknown_message(n) for n in names if n not in self._entries]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
