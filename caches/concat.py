"""The simplest cache: concatenate each step's keys and values onto the stored ones."""

from __future__ import annotations

import mlx.core as mx

from .base import Cache
from .registry import register


@register("concat")
class ConcatCache(Cache):
    """Keys and values grow by concatenation (mlx-lm's ConcatenateKVCache).

    Exact against the uncached model. Each step copies the whole cache, so decode cost grows
    with the context; prefer `preallocated` for long generations.
    Memory: 2 * B * n_kv_heads * offset * head_dim * itemsize bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.keys = None
        self.values = None

    def update_and_fetch(self, keys, values):
        self.check_update(keys, values)
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self._commit_layout(keys, values)
        self.offset += keys.shape[2]
        return self.keys, self.values

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)

    @classmethod
    def from_state(cls, state, meta_state):
        cache = cls()
        if state:
            cache.keys, cache.values = state
            cache._commit_layout(cache.keys, cache.values)
            cache.offset = cache.keys.shape[2]
        return cache

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = self._trim_count(n)
        if n:
            self.offset -= n
            self.keys = self.keys[..., : self.offset, :]
            self.values = self.values[..., : self.offset, :]
        return n
