"""Built-in samplers: greedy and temperature."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .registry import Sampler, register


def greedy_sample(logprobs: mx.array) -> mx.array:
    """The most likely token of each row."""
    return mx.argmax(logprobs, axis=-1)


@register("greedy")
def greedy() -> Sampler:
    """Always the most likely token."""
    return greedy_sample


@register("temperature")
def temperature(temp: float = 1.0, seed: Optional[int] = None) -> Sampler:
    """Sample from softmax(logprobs / temp). temp=0 is greedy. A seed makes runs reproducible."""
    if not isinstance(temp, (int, float)) or temp < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temp!r}")
    if temp == 0:
        return greedy_sample
    inv = 1.0 / float(temp)
    key = [mx.random.key(seed)] if seed is not None else None

    def sample(logprobs: mx.array) -> mx.array:
        if key is None:
            return mx.random.categorical(logprobs * inv)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv, key=sub)

    return sample
