"""What eviction caches (H2O, SnapKV) share: kept keys with their positions, and the record of
which keys each query could see.

Which keys an eviction cache keeps depends on attention scores, so on the chunking and on
float noise; the uncached oracle cannot recompute the choice. It can reproduce its effect: the
cache records, for every key, the first query position that no longer saw it (`evicted_at`;
keys are never brought back, so query q saw key k iff k <= q < evicted_at[k]). That record,
per layer (each layer keeps what its own scores chose), is the reference
(`VisibilityReference`): the masked uncached forward then equals the cached logits for every
chunking. The record costs 4 bytes per token per layer (int32), counted in `nbytes`; the keys
and values are what the budget bounds.

A subclass decides what to evict (`_select`), from the attention it saw (`_observe`).
Storage: keys/values [B, Hkv, S, D] of the kept tokens in position order, their positions
[S]; eviction chooses one set of keys per layer, for every head and row (scores summed over
them; see docs/caches.md for why not per head).
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .base import Cache, Fetched
from .reference import Reference

NEVER = 2**31 - 1  # evicted_at of a key still kept


class VisibilityReference(Reference):
    """Causal visibility minus what an eviction cache had evicted when each query attended:
    query q sees key k iff k <= q < evicted_at[k], from the record of layer `layer(i)`."""

    def __init__(self, cache: "EvictionCache") -> None:
        self.cache = cache

    def layer(self, index: int) -> "VisibilityReference":
        layers = self.cache.layers or [self.cache]
        if not 0 <= index < len(layers):
            raise ValueError(f"{self!r} covers {len(layers)} layers; the forward asked for layer {index}")
        return VisibilityReference(layers[index])

    def mask(self, q_positions: mx.array, k_positions: mx.array) -> mx.array:
        record = self.cache.evicted_at  # [offset]
        need = int(mx.max(k_positions).item()) + 1 if k_positions.size else 0
        if record is None or record.shape[0] < need:
            have = 0 if record is None else record.shape[0]
            pad = mx.full((need - have,), NEVER, dtype=mx.int32)
            record = pad if record is None else mx.concatenate([record, pad])
        until = record[k_positions]  # [Lk] (or [B, Lk])
        q, k = q_positions[..., :, None], k_positions[..., None, :]
        return (k <= q) & (q < until[..., None, :])

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.cache.options().items())
        return f"VisibilityReference({self.cache.name}: {options})"


class EvictionCache(Cache):
    """Kept keys and values with their positions, the eviction record, and `_evict(keep)`."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: Optional[mx.array] = None  # [B, H, S, D], kept tokens in position order
        self.values: Optional[mx.array] = None
        self.positions: Optional[mx.array] = None  # int32 [S]
        self.evicted_at: Optional[mx.array] = None  # int32 [offset]: NEVER while kept
        self.layers: list = []  # the model's caches, set by join (not saved: rebuilt on load)
        self.evicted = False  # True once any key was evicted

    def join(self, layers):
        self.layers = list(layers)

    # -- storage ---------------------------------------------------------------------------

    def _append(self, keys, values):
        prev, L = self.offset, keys.shape[2]
        new_positions = mx.arange(prev, prev + L, dtype=mx.int32)
        if self.keys is None:
            self.keys, self.values, self.positions = keys, values, new_positions
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
            self.positions = mx.concatenate([self.positions, new_positions])
        fresh = mx.full((L,), NEVER, dtype=mx.int32)
        self.evicted_at = fresh if self.evicted_at is None else mx.concatenate([self.evicted_at, fresh])
        # Every kept key is older than every new query, and the chunk is causal among itself.
        return Fetched(self.keys, self.values, self.positions if self.evicted else None, causal=True)

    def _evict(self, keep: mx.array) -> None:
        """Keep stored indices `keep` (ascending, uint32/int32 [n]); the others are evicted now:
        the next query (position `offset`) is the first that does not see them."""
        gone = mx.ones((self.positions.shape[0],), dtype=mx.bool_)
        gone[keep] = False
        self.evicted_at[self.positions] = mx.where(gone, self.offset, self.evicted_at[self.positions])
        self.keys = mx.take(self.keys, keep, axis=2)
        self.values = mx.take(self.values, keep, axis=2)
        self.positions = self.positions[keep]
        self.evicted = True

    def _positions(self):
        return self.positions if self.evicted else None

    def size(self) -> int:
        return 0 if self.positions is None else self.positions.shape[0]

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        raise NotImplementedError(
            f"{self.name} chooses which keys to keep from attention scores, and mlx-lm's models "
            f"attend without handing the cache their queries or scores; use it with kvzoo models")

    # -- life-cycle ------------------------------------------------------------------------

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
        S = keys.shape[2]
        if positions.shape != (S,) or evicted_at.shape != (self.offset,) or evicted.shape != (1,):
            raise ValueError(f"{self.name} cache state does not fit: {S} keys, positions "
                             f"{positions.shape}, record {evicted_at.shape} for offset {self.offset}")
        self.keys, self.values = keys, values
        self.positions, self.evicted_at = positions.astype(mx.int32), evicted_at.astype(mx.int32)
        self.evicted = bool(evicted.item())
        self._restore_extra(tuple(state[5:]))

    def _trim_refusal(self) -> Optional[str]:
        if type(self)._trim is Cache._trim:
            return "(this strategy does not support it)"
        return None


def check_int(cache: str, name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{cache} cache: {name} must be an int >= {low}, got {value!r}")
