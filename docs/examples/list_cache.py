"""An exact cache in one small file: each update kept as its own chunk (docs/architecture.md).

    kvzoo check --plugin docs/examples/list_cache.py --caches list
"""

import mlx.core as mx

import caches


@caches.register("list")
class ListCache(caches.Cache):
    """Keeps each update's keys and values [B, Hkv, L, D] as a chunk; joins them on fetch."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def _append(self, keys, values):
        self.chunks.append((keys, values))
        return self.state

    @property
    def state(self):
        if not self.chunks:
            return ()
        return (mx.concatenate([k for k, _ in self.chunks], axis=2),
                mx.concatenate([v for _, v in self.chunks], axis=2))

    def _restore(self, state):
        self.chunks = [tuple(state)]

    def _trim(self, n):
        keys, values = self.state
        keep = self.offset - n
        self.chunks = [(keys[..., :keep, :], values[..., :keep, :])] if keep else []
