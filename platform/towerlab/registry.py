"""A small generic name -> builder registry used by every pluggable part (losses, towers, sources, evaluators).

Each entry may carry a typed config dataclass, so the config layer can resolve a `name:` key first and then merge
that variant's schema (OmegaConf cannot hold a union of dataclasses). This module imports nothing of towerlab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from towerlab.util import did_you_mean

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    builder: T
    config: type | None  # dataclass holding the variant's typed parameters, or None
    help: str


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, config: type | None = None, help: str = "") -> Callable[[T], T]:
        """Decorator: `@LOSSES.register("clip", config=ClipConfig)`."""

        def deco(builder: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} '{name}' is registered twice")
            doc = help or (getattr(builder, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, builder, config, doc)
            return builder

        return deco

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def get(self, name: str) -> T:
        return self.entry(name).builder

    def unknown_message(self, name: str) -> str:
        valid = sorted(self._entries)
        return f"unknown {self.kind} '{name}'.{did_you_mean(name, valid)} Valid: {', '.join(valid) or '(none registered)'}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]
