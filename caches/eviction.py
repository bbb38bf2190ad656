"""What eviction caches (H2O, SnapKV) share: kept keys with their positions, per row and
key/value head, and the record of which keys each query could see.

Which keys an eviction cache keeps depends on attention scores, so on the chunking and on
float noise; the uncached oracle cannot recompute the choice. It can reproduce its effect: the
cache records, for every row, key/value head and key, the first query position that no longer
saw it (`evicted_at`; keys are never brought back, so query q saw key k iff k <= q <
evicted_at[k]). That record, per layer (each layer keeps what its own scores chose), is the
reference (`VisibilityReference`, a mask per kv head): the masked uncached forward then equals
the cached logits for every chunking. The record costs 4 bytes per token, row and kv head per
layer (int32), counted in `nbytes`; the keys and values are what the budget bounds.

A subclass decides what to evict, from the attention it saw. By default each key/value head
chooses its own keys (`per_head=True`: scores summed over the query heads that read it, as
SnapKV and kvpress do), so keys and their positions differ per head: storage is keys/values
[B, Hkv, S, D] and positions [B, Hkv, S], every head holding S keys in position order.
`per_head=False` sums the scores over every head of the layer: one choice per row and layer
(the same positions in every head).
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .base import Cache, Fetched
from .reference import Reference

NEVER = 2**31 - 1  # evicted_at of a key still kept


class VisibilityReference(Reference):
    """Causal visibility minus what an eviction cache had evicted when each query attended:
    query q sees key k in row b and kv head h iff k <= q < evicted_at[b, h, k], from the record
    of layer `layer(i)`. Its mask is per kv head: [B, Hkv, Lq, Lk]."""

    def __init__(self, cache: "EvictionCache") -> None:
        self.cache = cache

    def layer(self, index: int) -> "VisibilityReference":
        layers = self.cache.layers or [self.cache]
        if not 0 <= index < len(layers):
            raise ValueError(f"{self!r} covers {len(layers)} layers; the forward asked for layer {index}")
        return VisibilityReference(layers[index])

    def mask(self, q_positions: mx.array, k_positions: mx.array) -> mx.array:
        """q_positions [Lq]; k_positions [Lk] (the oracle: positions 0..Lk-1) or [B, Hkv, S]
        (what the cache holds) -> bool [B, Hkv, Lq, Lk]."""
        q = q_positions[..., :, None]
        record = self.cache.evicted_at  # [B, Hkv, offset], or None before any update
        if record is None:
            return q >= k_positions[..., None, :]  # nothing stored, nothing evicted
        need = int(mx.max(k_positions).item()) + 1 if k_positions.size else 0
        if record.shape[-1] < need:  # positions not written yet were never evicted
            pad = mx.full((*record.shape[:2], need - record.shape[-1]), NEVER, dtype=mx.int32)
            record = mx.concatenate([record, pad], axis=-1)
        if k_positions.ndim == 1:
            until = record[..., k_positions]  # [B, Hkv, Lk]
        else:
            until = mx.take_along_axis(record, k_positions, axis=-1)
        k = k_positions[..., None, :]
        return (k <= q) & (q < until[..., None, :])  # [B, Hkv, Lq, Lk]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.cache.options().items())
        return f"VisibilityReference({self.cache.name}: {options})"


class EvictionCache(Cache):
    """Kept keys and values with their positions per row and kv head, the eviction record,
    `_scores` (attention weights -> a score per row, kv head and key) and `_evict(keep)`."""

    per_head: bool = True  # a subclass's option: each kv head chooses its own keys

    def __init__(self) -> None:
        super().__init__()
        self.keys: Optional[mx.array] = None  # [B, Hkv, S, D], kept tokens in position order per head
        self.values: Optional[mx.array] = None
        self.positions: Optional[mx.array] = None  # int32 [B, Hkv, S]
        self.evicted_at: Optional[mx.array] = None  # int32 [B, Hkv, offset]: NEVER while kept
        self.layers: list = []  # the model's caches, set by join (not saved: rebuilt on load)
        self.evicted = False  # True once any key was evicted

    def join(self, layers):
        self.layers = list(layers)

    # -- storage ---------------------------------------------------------------------------

    def _append(self, keys, values):
        prev, (B, H, L, _) = self.offset, keys.shape
        new_positions = mx.broadcast_to(mx.arange(prev, prev + L, dtype=mx.int32), (B, H, L))
        fresh = mx.full((B, H, L), NEVER, dtype=mx.int32)
        if self.keys is None:
            self.keys, self.values, self.positions, self.evicted_at = keys, values, new_positions, fresh
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
            self.positions = mx.concatenate([self.positions, new_positions], axis=-1)
            self.evicted_at = mx.concatenate([self.evicted_at, fresh], axis=-1)
        # Every kept key is older than every new query, and the chunk is causal among itself.
        return Fetched(self.keys, self.values, self.positions if self.evicted else None, causal=True)

    def _scores(self, weights: mx.array) -> mx.array:
        """Attention weights [B, Hq, L, S] -> float32 [B, Hkv, S]: each key's weight summed over
        the queries and over the query heads that read its kv head; with `per_head=False`,
        over every head of the layer (the same score in every kv head). Split by heads over
        processes (zoo.shard), summed over the processes that share the heads."""
        B, Hq, L, S = weights.shape
        Hkv = self.keys.shape[1]
        grouped = weights.astype(mx.float32).reshape(B, Hkv, Hq // Hkv, L, S).sum(axis=(2, 3))
        if self.per_head:
            return self.across_kv_copies(grouped)
        layer = self.across_heads(grouped.sum(axis=1, keepdims=True))  # [B, 1, S]: every head
        return mx.broadcast_to(layer, grouped.shape)

    def _evict(self, keep: mx.array) -> None:
        """Keep stored indices `keep` (int32 [B, Hkv, n], ascending in each row and head); the
        others are evicted now: the next query (position `offset`) is the first that does not
        see them."""
        gone = mx.put_along_axis(mx.ones(self.positions.shape, dtype=mx.bool_), keep, mx.array(False), axis=-1)
        was = mx.take_along_axis(self.evicted_at, self.positions, axis=-1)
        self.evicted_at = mx.put_along_axis(self.evicted_at, self.positions,
                                            mx.where(gone, self.offset, was), axis=-1)
        self.keys = mx.take_along_axis(self.keys, keep[..., None], axis=2)
        self.values = mx.take_along_axis(self.values, keep[..., None], axis=2)
        self.positions = mx.take_along_axis(self.positions, keep, axis=-1)
        self.evicted = True

    def _positions(self):
        return self.positions if self.evicted else None

    def size(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        raise NotImplementedError(
            f"{self.name} chooses which keys to keep from attention scores, and mlx-lm's models "
            f"attend without handing the cache their queries or scores; use it with kvzoo models")

    # -- life-cycle ------------------------------------------------------------------------

    def _forget_newest(self, n: int) -> None:
        """Drop the newest n stored tokens of every head (they were never evicted: the newest n
        stored are positions offset-n..offset-1 in every head)."""
        keep = self.size() - n
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
        self.positions = self.positions[..., :keep]
        self.evicted_at = self.evicted_at[..., : self.offset - n]

    def _extra_state(self) -> tuple:
        """A subclass's own arrays, saved after keys, values, positions and the record."""
        return ()

    def _restore_extra(self, arrays: tuple) -> None:
        if arrays:
            raise ValueError(f"{self.name} cache state has {len(arrays)} arrays too many")

    @property
    def state(self):
        if self.keys is None:
            return ()
        evicted = mx.array([int(self.evicted)], dtype=mx.int32)
        return (self.keys, self.values, self.positions, self.evicted_at, evicted) + self._extra_state()

    def _restore(self, state):
        if len(state) < 5:
            raise ValueError(f"{self.name} cache state needs keys, values, positions, the "
                             f"eviction record and its flag; got {len(state)} arrays")
        keys, values, positions, evicted_at, evicted = state[:5]
        self.check_update(keys, values)
        B, H, S = keys.shape[:3]
        if positions.shape != (B, H, S) or evicted_at.shape != (B, H, self.offset) or evicted.shape != (1,):
            raise ValueError(f"{self.name} cache state does not fit: keys {keys.shape}, positions "
                             f"{positions.shape} (want {(B, H, S)}), record {evicted_at.shape} "
                             f"(want {(B, H, self.offset)})")
        self.keys, self.values = keys, values
        self.positions, self.evicted_at = positions.astype(mx.int32), evicted_at.astype(mx.int32)
        self.evicted = bool(evicted.item())
        self._restore_extra(tuple(state[5:]))

    def _trim_refusal(self) -> Optional[str]:
        if type(self)._trim is Cache._trim:
            return "(this strategy does not support it)"
        return None


def check_bool(cache: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{cache} cache: {name} must be True or False, got {value!r}")


def check_int(cache: str, name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{cache} cache: {name} must be an int >= {low}, got {value!r}")
