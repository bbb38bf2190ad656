"""Positional-scheme registry: `@register(name)` on a Positional subclass; `make(name, config)`."""

from __future__ import annotations

from typing import Any, Callable

from kvzoo.registry import Registry

from .base import Positional


def _check(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Positional)):
        raise TypeError(f"positional.register({name!r}) needs a Positional subclass, got {cls!r}")


SCHEMES: Registry[type[Positional]] = Registry("positional scheme", check=_check)


def register(name: str) -> Callable[[type[Positional]], type[Positional]]:
    """Class decorator: make a Positional subclass available as `name`.

    The class must provide `from_config(config)`, reading what it needs from a model config
    (d_model, n_heads, head_dim, max_positions, rope_base, rope_traditional, rope_scale).
    """

    def add(cls: type[Positional]) -> type[Positional]:
        SCHEMES.add(name, cls)
        cls.name = name
        return cls

    return add


def available() -> list[str]:
    """Names of all registered positional schemes."""
    return SCHEMES.available()


def get(name: str) -> type[Positional]:
    """The scheme class registered as `name`."""
    return SCHEMES.get(name)


def make(name: str, config: Any) -> Positional:
    """Build scheme `name` for a model `config`."""
    return get(name).from_config(config)
