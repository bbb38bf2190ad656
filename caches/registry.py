"""Cache registry: `@register(name)` on a Cache subclass; `make(name, model, **options)`."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .base import Cache

_CACHES: dict[str, type[Cache]] = {}


def register(name: str) -> Callable[[type[Cache]], type[Cache]]:
    """Class decorator: make a Cache subclass available as `name`."""

    def add(cls: type[Cache]) -> type[Cache]:
        if not (isinstance(cls, type) and issubclass(cls, Cache)):
            raise TypeError(f"caches.register({name!r}) needs a Cache subclass, got {cls!r}")
        if name in _CACHES and _CACHES[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"cache name {name!r} is already registered to {_CACHES[name].__name__}")
        cls.name = name
        _CACHES[name] = cls
        return cls

    return add


def available() -> list[str]:
    """Names of all registered caches."""
    return sorted(_CACHES)


def get(name: str) -> type[Cache]:
    """The cache class registered as `name`."""
    if name not in _CACHES:
        raise ValueError(f"unknown cache {name!r}; registered caches: {', '.join(available())}")
    return _CACHES[name]


def options_of(name: str) -> dict[str, Any]:
    """The options a cache accepts, with their defaults."""
    params = inspect.signature(get(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def make(name: str, model: Any, **options: Any) -> list[Cache]:
    """One fresh cache per attention layer of `model` (anything with a `layers` list)."""
    cls = get(name)
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) or "none"
        raise TypeError(f"cache {name!r} got unknown option(s) {unknown}; it accepts: {listed}")
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"caches.make needs a model with a `layers` list, got {type(model).__name__}")
    caches = [cls(**options) for _ in layers]
    for cache in caches[:1]:
        cache.check_model(model)
    return caches


def examples(name: str, *, head_dim: int, seq_len: int) -> list[dict[str, Any]]:
    """Option sets of cache `name` worth testing on a model with this head size and a sequence
    this long ([] if the cache cannot serve such a model). The property test, `kvzoo check`,
    `kvzoo bench` and `kvzoo study` draw from it, so a registered cache is covered everywhere."""
    return get(name).conformance_examples(head_dim=head_dim, seq_len=seq_len)


def exact_for(name: str, *, seq_len: int, **options: Any) -> bool:
    """Whether cache `name` with `options` reproduces the true uncached model (not only its own
    reference) over a sequence of `seq_len` tokens."""
    return get(name).exact_for(seq_len=seq_len, **options)
