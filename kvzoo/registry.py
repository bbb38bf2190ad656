"""One small registry class behind every `register(name)` in kvzoo.

    FAMILIES = Registry("model family")
    @FAMILIES.decorator("llama", defaults={...})
    class Llama: ...
    FAMILIES.get("llama")          # the class; an unknown name is a ValueError listing the known
    FAMILIES.entry("llama")        # the extra fields given at registration ({"defaults": ...})

caches, positional, sampling and zoo each keep one (or two) of these. Registering a name twice
with a different object is an error, unless it is the same definition imported again (same
qualified name, as when a user's file is loaded twice).
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name, with optional extra fields per entry and a check on what is added."""

    def __init__(self, kind: str, plural: Optional[str] = None,
                 check: Optional[Callable[[str, Any], None]] = None) -> None:
        self.kind = kind  # for messages: "cache", "positional scheme", "sampler", ...
        self.plural = plural or kind + "s"
        self._check = check  # raises TypeError if an object cannot be registered
        self._items: dict[str, T] = {}
        self._extra: dict[str, dict[str, Any]] = {}

    def add(self, name: str, obj: T, **extra: Any) -> T:
        """Register `obj` as `name` with `extra` fields; returns obj."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty str, got {name!r}")
        if self._check is not None:
            self._check(name, obj)
        old = self._items.get(name)
        if old is not None and getattr(old, "__qualname__", old) != getattr(obj, "__qualname__", obj):
            raise ValueError(f"{self.kind} name {name!r} is already registered to {_label(old)}")
        self._items[name] = obj
        self._extra[name] = dict(extra)
        return obj

    def decorator(self, name: str, **extra: Any) -> Callable[[T], T]:
        """`@registry.decorator(name, **extra)`: register what it decorates."""

        def add(obj: T) -> T:
            return self.add(name, obj, **extra)

        return add

    def remove(self, name: str) -> T:
        """Unregister `name` (tests and plugin reloads); returns what was registered."""
        obj = self.get(name)
        del self._items[name], self._extra[name]
        return obj

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> T:
        """What is registered as `name`; ValueError listing the registered names otherwise."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.plural}: "
                             f"{', '.join(self.available()) or 'none'}")
        return self._items[name]

    def entry(self, name: str) -> dict[str, Any]:
        """The extra fields `name` was registered with."""
        self.get(name)
        return self._extra[name]

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._items[name]) for name in self.available()]

    def __contains__(self, name: object) -> bool:
        return name in self._items


def _label(obj: Any) -> str:
    return getattr(obj, "__name__", repr(obj))
