"""Registries of samplers and logits processors: `@register(name)` on a factory, `make(name, **options)`.

A sampler maps log-probabilities [B, V] to token ids [B]. A logits processor maps
(tokens so far [N], logits [1, V]) to logits [1, V]; the generation loop applies processors in
order before the sampler.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import mlx.core as mx

from kvzoo.registry import Registry

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class FactoryRegistry(Registry[Callable[..., Any]]):
    """Factories by name; `make` checks option names before calling one."""

    def make(self, name: str, **options: Any) -> Any:
        factory = self.get(name)
        params = inspect.signature(factory).parameters
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise TypeError(f"{self.kind} {name!r} got unknown option(s) {unknown}; "
                            f"it accepts: {', '.join(params) or 'none'}")
        return factory(**options)


SAMPLERS = FactoryRegistry("sampler")
PROCESSORS = FactoryRegistry("logits processor")


def register(name: str) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
    """Decorator on a factory `f(**options) -> sampler`, available as `name`."""
    return SAMPLERS.decorator(name)


def available() -> list[str]:
    """Names of all registered samplers."""
    return SAMPLERS.available()


def get(name: str) -> Callable[..., Sampler]:
    """The sampler factory registered as `name`."""
    return SAMPLERS.get(name)


def make(name: str, **options: Any) -> Sampler:
    """Build sampler `name` with `options` (e.g. make("top_p", top_p=0.9, temp=0.7, seed=0))."""
    return SAMPLERS.make(name, **options)


def register_processor(name: str) -> Callable[[Callable[..., LogitsProcessor]], Callable[..., LogitsProcessor]]:
    """Decorator on a factory `f(**options) -> logits processor`, available as `name`."""
    return PROCESSORS.decorator(name)


def available_processors() -> list[str]:
    """Names of all registered logits processors."""
    return PROCESSORS.available()


def make_processor(name: str, **options: Any) -> LogitsProcessor:
    """Build logits processor `name` (e.g. make_processor("repetition_penalty", penalty=1.3))."""
    return PROCESSORS.make(name, **options)
