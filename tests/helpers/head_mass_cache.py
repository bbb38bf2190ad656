"""A cache whose choice couples the heads of a layer, for tests/test_distributed.py: it keeps the
`budget` keys with the most attention mass summed over every query and every head (H2O's rule
without its recent window). Split by heads over processes, each process sees only its heads'
mass; summing it through `Cache.across_heads` makes every process keep the keys one process
would. Loaded as a plugin by tests/helpers/distributed_worker.py.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

import caches


@caches.register("head-mass", examples=lambda head_dim, seq_len: [{"budget": max(2, seq_len // 3)}],
                 exact=lambda seq_len, budget: seq_len <= budget)
class HeadMassCache(caches.Cache):
    """At most `budget` keys per layer between updates: those with the largest attention mass,
    summed over queries and over every head of the layer (across processes)."""

    def __init__(self, budget: int = 8):
        super().__init__()
        self.budget = budget
        self.keys = self.values = None  # [B, Hkv, S, D]
        self.kept: Optional[mx.array] = None  # int32 [S]: absolute position of each kept key
        self.mass: Optional[mx.array] = None  # float32 [S]

    def _append(self, keys, values):
        new = mx.arange(self.offset, self.offset + keys.shape[2], dtype=mx.int32)
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
            new = mx.concatenate([self.kept, new])
        self.keys, self.values, self.kept = keys, values, new
        return caches.Fetched(keys, values, new)

    def _positions(self):
        return self.kept

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values, self.kept, self.mass)

    def _restore(self, state):
        self.keys, self.values, self.kept, self.mass = state

    def attend(self, queries, keys, values, *, scale, q_positions, bias=None):
        keys, values = self.update_and_fetch(keys, values)
        positions = self.kept
        repeat = queries.shape[1] // keys.shape[1]
        k = mx.repeat(keys, repeat, axis=1)  # [B, Hq, S, D]
        v = mx.repeat(values, repeat, axis=1)
        scores = (queries * scale) @ k.swapaxes(-1, -2)  # [B, Hq, L, S]
        if bias is not None:
            extra = bias(q_positions, positions)
            if extra is not None:
                scores = scores + extra
        visible = q_positions[:, None] >= positions[None, :]
        weights = mx.softmax(mx.where(visible, scores, -mx.inf).astype(mx.float32), axis=-1)
        out = weights.astype(v.dtype) @ v  # [B, Hq, L, D]
        mass = self.across_heads(weights.sum(axis=(0, 1, 2)))  # [S], every head of the layer
        L = queries.shape[2]
        self.mass = mass if self.mass is None else mass + mx.concatenate([self.mass, mx.zeros((L,))])
        if self.mass.shape[0] > self.budget:
            keep = mx.sort(mx.argpartition(-self.mass, kth=self.budget - 1)[: self.budget])
            self.keys, self.values = mx.take(self.keys, keep, axis=2), mx.take(self.values, keep, axis=2)
            self.kept, self.mass = mx.take(self.kept, keep), mx.take(self.mass, keep)
        return out
