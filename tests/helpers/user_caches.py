"""Caches a user might write, correct and broken, for the tests of extending kvzoo.

Each is written against the protocol a user sees (caches.Cache's storage hooks), not against
kvzoo's internals; the broken ones carry a real bug of the kind the seed documents describe.
"""

from __future__ import annotations

import mlx.core as mx

import caches


class NewestFirstCache(caches.Cache):
    """Stores keys newest first: exact, but never in order, so masks come from positions."""

    def __init__(self):
        super().__init__()
        self.keys = self.values = None

    def _append(self, keys, values):
        keys, values = keys[:, :, ::-1], values[:, :, ::-1]  # [B, H, L, D], newest first
        if self.keys is not None:
            keys = mx.concatenate([keys, self.keys], axis=2)
            values = mx.concatenate([values, self.values], axis=2)
        self.keys, self.values = keys, values
        return caches.Fetched(keys, values, mx.arange(keys.shape[2] - 1, -1, -1, dtype=mx.int32))

    def _positions(self):
        return mx.arange(self.offset - 1, -1, -1, dtype=mx.int32)

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)

    def _restore(self, state):
        self.keys, self.values = state


class LyingOrderCache(NewestFirstCache):
    """The nanoGPT-style bug: slots out of time order, but returned as if in order."""

    def _append(self, keys, values):
        fetched = super()._append(keys, values)
        return fetched.keys, fetched.values

    def _positions(self):
        return None


class ForgetfulCache(NewestFirstCache):
    """Silently drops the oldest token once it holds 6, while declaring the exact reference."""

    def _append(self, keys, values):
        fetched = super()._append(keys, values)
        return caches.Fetched(fetched.keys[:, :, :6], fetched.values[:, :, :6], fetched.positions[:6])

    def _positions(self):
        return super()._positions()[:6]


def forget_plugin(cache_name: str, file_stem: str) -> None:
    """Undo loading a plugin file: unregister its cache and drop its module, so that the next
    `--plugin` of the same file registers it again."""
    import sys

    from caches.registry import CACHES

    if cache_name in CACHES:
        CACHES.remove(cache_name)
    for module in [m for m in sys.modules if m.startswith(f"kvzoo_plugin_{file_stem}_")]:
        del sys.modules[module]
