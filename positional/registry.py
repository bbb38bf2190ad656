"""Positional-scheme registry: `@register(name)` on a Positional subclass; `make(name, config)`."""

from __future__ import annotations

from typing import Any, Callable

from .base import Positional

_SCHEMES: dict[str, type[Positional]] = {}


def register(name: str) -> Callable[[type[Positional]], type[Positional]]:
    """Class decorator: make a Positional subclass available as `name`.

    The class must provide `from_config(config)`, reading what it needs from a model config
    (d_model, n_heads, head_dim, max_positions, rope_base, rope_traditional, rope_scale).
    """

    def add(cls: type[Positional]) -> type[Positional]:
        if not (isinstance(cls, type) and issubclass(cls, Positional)):
            raise TypeError(f"positional.register({name!r}) needs a Positional subclass")
        if name in _SCHEMES and _SCHEMES[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"positional scheme {name!r} is already registered")
        cls.name = name
        _SCHEMES[name] = cls
        return cls

    return add


def available() -> list[str]:
    """Names of all registered positional schemes."""
    return sorted(_SCHEMES)


def get(name: str) -> type[Positional]:
    """The scheme class registered as `name`."""
    if name not in _SCHEMES:
        raise ValueError(
            f"unknown positional scheme {name!r}; registered schemes: {', '.join(available())}"
        )
    return _SCHEMES[name]


def make(name: str, config: Any) -> Positional:
    """Build scheme `name` for a model `config`."""
    return get(name).from_config(config)
