"""One small registry for every family that grows: merge methods, judges, metrics, regularizers.

Entries are looked up by name; a spec ``"NAME:key=value,key=value"`` passes options, the same
syntax everywhere a method, judge or metric is named (CLI, YAML, Python).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name or a bad option in a spec; the message lists what exists."""


def parse_value(text: str) -> Any:
    """``"true"`` -> True, ``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"[0.2, 0.8]"`` -> a list,
    anything else stays text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low.startswith("["):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def split_items(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=1,w=[1, 2]"`` -> ``["a=1", "w=[1, 2]"]``."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def parse_options(text: str) -> dict[str, Any]:
    """``"lowercase=false,k=8"`` -> ``{"lowercase": False, "k": 8}``."""
    options: dict[str, Any] = {}
    for item in split_items(text):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RegistryError(f"option {item!r} is not key=value")
        options[key.strip()] = parse_value(value)
    return options


def split_spec(spec: str) -> tuple[str, str]:
    """``"NAME:rest"`` -> ``("NAME", "rest")``; the rest is empty when there is no colon."""
    name, _, rest = spec.partition(":")
    return name.strip(), rest.strip()


class Registry(Generic[T]):
    """Named entries of one family (``kind`` names it in errors)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding a class (or factory) under ``name``; a class gets ``.name`` set."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            if isinstance(entry, type):
                entry.name = name
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The entry registered under ``name``, or an error listing every name."""
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names())}"
            ) from None

    def create(self, spec: str, positional: str | None = None, **options: Any) -> Any:
        """Instantiate from ``"NAME"`` or ``"NAME:key=value,..."``.

        With ``positional`` set, a rest without ``=`` is passed as that keyword (e.g.
        ``classifier:PATH`` passes ``path``). A wrong keyword becomes a :class:`RegistryError`.
        """
        name, rest = split_spec(spec)
        factory = self.get(name)
        if rest and positional and "=" not in rest:
            options[positional] = rest
        elif rest:
            options.update(parse_options(rest))
        try:
            return factory(**options)
        except TypeError as error:
            raise RegistryError(f"{self.kind} {spec!r}: {error}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
