"""Sampler registry: `@register(name)` on a factory; `make(name, **options)` returns a sampler.

A sampler maps log-probabilities [B, V] to token ids [B].
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]

_SAMPLERS: dict[str, Callable[..., Sampler]] = {}


def register(name: str) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
    """Decorator on a factory `f(**options) -> sampler`, available as `name`."""

    def add(factory: Callable[..., Sampler]) -> Callable[..., Sampler]:
        if name in _SAMPLERS and _SAMPLERS[name].__qualname__ != factory.__qualname__:
            raise ValueError(f"sampler {name!r} is already registered")
        _SAMPLERS[name] = factory
        return factory

    return add


def available() -> list[str]:
    """Names of all registered samplers."""
    return sorted(_SAMPLERS)


def get(name: str) -> Callable[..., Sampler]:
    """The factory registered as `name`."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered samplers: {', '.join(available())}")
    return _SAMPLERS[name]


def make(name: str, **options: Any) -> Sampler:
    """Build sampler `name` with `options` (e.g. make("temperature", temp=0.7))."""
    factory = get(name)
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise TypeError(
            f"sampler {name!r} got unknown option(s) {unknown}; it accepts: {', '.join(params) or 'none'}"
        )
    return factory(**options)
