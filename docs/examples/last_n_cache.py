"""A window cache in one small file: only the last `window` tokens are kept (docs/architecture.md).

Its reference is the sliding window (`caches.WindowReference` with no sinks): query p sees the
keys p - window + 1 .. p. It is exact against the true model while the sequence fits.

    kvzoo check --plugin docs/examples/last_n_cache.py --caches last-n
"""

import mlx.core as mx

import caches


def window_options(head_dim, seq_len):
    return [{"window": max(1, seq_len // 3)}, {"window": seq_len}]


@caches.register("last-n", reference=lambda cache: caches.WindowReference(cache.window, 0),
                 examples=window_options, exact=lambda seq_len, window: seq_len <= window)
class LastNCache(caches.Cache):
    """Concatenates, then drops all but the newest `window` tokens."""

    def __init__(self, window: int = 256):
        super().__init__()
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"last-n cache: window must be an int >= 1, got {window!r}")
        self.window = window
        self.keys = self.values = None

    def _append(self, keys, values):
        first = self.offset  # position of keys[:, :, 0]
        if self.keys is not None:  # the stored window, then the new tokens: [B, Hkv, S, D]
            first -= self.keys.shape[2]
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys[..., -self.window:, :], values[..., -self.window:, :]
        positions = mx.arange(first, first + keys.shape[2], dtype=mx.int32)
        return caches.Fetched(keys, values, positions)  # the reference's mask hides the rest

    def _positions(self):
        first = max(0, self.offset - self.window)
        return mx.arange(first, self.offset, dtype=mx.int32)

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)

    def _restore(self, state):
        self.keys, self.values = state
