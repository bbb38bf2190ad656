"""The simplest cache: concatenate each step's keys and values onto the stored ones."""

from __future__ import annotations

import mlx.core as mx

from .base import KeyValueRows
from .registry import register


@register("concat", ragged=True)
class ConcatCache(KeyValueRows):
    """Keys and values grow by concatenation (mlx-lm's ConcatenateKVCache).

    Exact against the uncached model. Each step copies the whole cache, so decode cost grows
    with the context; prefer `preallocated` for long generations.
    Memory: 2 * B * n_kv_heads * offset * head_dim * itemsize bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.keys = self.values = None

    def _append(self, keys, values):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        return self.keys, self.values

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)

    def _restore(self, state):
        keys, values = state
        if keys.shape[2] != self.offset:
            raise ValueError(f"concat cache state holds {keys.shape[2]} tokens, its offset says {self.offset}")
        self.keys, self.values = keys, values

    def _trim(self, n):
        self.keys = self.keys[..., : self.offset - n, :]
        self.values = self.values[..., : self.offset - n, :]
