"""Samplers: greedy, temperature, and temperature after top-k / top-p / min-p truncation.

    sampler = sampling.make_sampler(temp=0.8, top_p=0.95, top_k=40, seed=0)
    token = sampler(logprobs)      # logprobs [B, V] -> token ids [B]

As in mlx-lm, the filters act on the model's distribution (top-p, then min-p, then top-k) and
the temperature reshapes what is left. A seed gives the sampler its own random key, so a
seeded run is reproducible whatever else uses MLX's global random state; without a seed it
draws from the global state (`mx.random.seed`), exactly as mlx-lm's sampler does.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .filters import check_temperature, min_p_filter, top_k_filter, top_p_filter
from .registry import Sampler, register


def greedy_sample(logprobs: mx.array) -> mx.array:
    """The most likely token of each row."""
    return mx.argmax(logprobs, axis=-1)


greedy_sample.greedy = True  # deterministic: what speculative decoding verifies by argmax


def check_seed(seed: Any) -> Optional[int]:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be None or an int in [0, 2**64) (a uint64 random key), got {seed!r}")
    return seed


def categorical(temp: float, seed: Optional[int] = None) -> Sampler:
    """Draw from softmax(logprobs / temp): from the global random state, or from `seed`'s own key."""
    if seed is None:
        from mlx_lm.sample_utils import categorical_sampling  # lazy: importing mlx_lm loads transformers and torch (seconds)

        return lambda logprobs: categorical_sampling(logprobs, temp)
    inv = 1.0 / temp
    key = [mx.random.key(seed)]

    def sample(logprobs: mx.array) -> mx.array:
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv, key=sub)

    return sample


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    seed: Optional[int] = None,
) -> Sampler:
    """A sampler from the usual options; temp=0 is greedy (the filters then change nothing).

    top_p in (0, 1] (1: off), top_k >= 0 (0: off), min_p in [0, 1] (0: off).
    """
    temp = check_temperature(temp)
    filters = [f for f in (top_p_filter(top_p), min_p_filter(min_p, min_tokens_to_keep), top_k_filter(top_k)) if f]
    seed = check_seed(seed)
    if temp == 0:
        return greedy_sample
    draw = categorical(temp, seed)

    def filtered(logprobs: mx.array) -> mx.array:
        for keep in filters:
            logprobs = keep(logprobs)
        return logprobs

    def sample(logprobs: mx.array) -> mx.array:
        return draw(filtered(logprobs))

    def distribution(logprobs: mx.array) -> mx.array:
        """The probabilities [B, V] this sampler draws from: the filters, then the temperature."""
        return mx.softmax(filtered(logprobs) / temp, axis=-1, precise=True)

    sample.distribution, sample.seed = distribution, seed  # for speculative sampling
    return sample


@register("greedy")
def greedy() -> Sampler:
    """Always the most likely token."""
    return greedy_sample


@register("temperature")
def temperature(temp: float = 1.0, seed: Optional[int] = None) -> Sampler:
    """Sample from softmax(logprobs / temp). temp=0 is greedy."""
    return make_sampler(temp=temp, seed=seed)


@register("top_k")
def top_k(top_k: int, temp: float = 1.0, seed: Optional[int] = None) -> Sampler:
    """Sample among the `top_k` most likely tokens."""
    return make_sampler(temp=temp, top_k=top_k, seed=seed)


@register("top_p")
def top_p(top_p: float, temp: float = 1.0, seed: Optional[int] = None) -> Sampler:
    """Nucleus sampling: among the fewest most likely tokens holding `top_p` of the mass."""
    return make_sampler(temp=temp, top_p=top_p, seed=seed)


@register("min_p")
def min_p(min_p: float, temp: float = 1.0, min_tokens_to_keep: int = 1, seed: Optional[int] = None) -> Sampler:
    """Sample among tokens at least `min_p` times as likely as the most likely one."""
    return make_sampler(temp=temp, min_p=min_p, min_tokens_to_keep=min_tokens_to_keep, seed=seed)
