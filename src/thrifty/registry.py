"""One small registry type behind every name a user types: methods, backbones, datasets, compressors and
objectives. The name comes from the registered class (`config_cls.method`, `Objective.name`, ...), so there is
no second string to keep in sync; built-ins register themselves when their package is first imported."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from thrifty.errors import ConfigError


T = TypeVar("T")


class Registry(Generic[T]):
    """`kind` names the table in messages; `builtins` is the module whose import registers the built-in entries,
    or a function that imports them (run on first lookup, so a registry never imports upward at module load)."""

    def __init__(self, kind: str, builtins: str | Callable[[], object] | None = None):
        self.kind, self.builtins = kind, builtins
        self._entries: dict[str, T] = {}
        self._loaded = builtins is None

    def register(self, name: str, entry: T) -> T:
        if not name:
            raise ConfigError(f"a {self.kind} needs a non-empty name")
        if name in self._entries:
            if self._entries[name] != entry:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pick another name or unregister it")
            return self._entries[name]  # the same registration again (a module imported twice) is a no-op
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the import: a built-in that looks another one up must not recurse
            try:
                importlib.import_module(self.builtins) if isinstance(self.builtins, str) else self.builtins()
            except BaseException:
                self._loaded = False
                raise

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entries(self) -> dict[str, T]:
        """{name: entry} of everything registered (built-ins loaded)."""
        self._load()
        return dict(self._entries)
