"""A preallocated cache: write into a buffer, grown in steps or fixed in size."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .base import Cache
from .registry import register


@register("preallocated")
class PreallocatedCache(Cache):
    """Keys and values written in place into a buffer (mlx-lm's KVCache).

    With `capacity=None` the buffer grows `step` slots at a time; with `capacity=N` it is
    allocated once for N tokens and appending past N raises (the cache is left unchanged).
    Exact against the uncached model. Memory: the allocated buffer,
    2 * B * n_kv_heads * slots * head_dim * itemsize bytes.
    """

    def __init__(self, step: int = 256, capacity: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"preallocated cache: step must be an int >= 1, got {step!r}")
        if capacity is not None and (
            not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1
        ):
            raise ValueError(
                f"preallocated cache: capacity must be None (grow) or an int >= 1, got {capacity!r}"
            )
        self.step = step
        self.capacity = capacity
        self.keys = None
        self.values = None

    def update_and_fetch(self, keys, values):
        self.check_update(keys, values)
        B, H, L, Dk = keys.shape
        prev = self.offset
        if self.capacity is not None and prev + L > self.capacity:
            raise ValueError(
                f"preallocated cache is full: capacity {self.capacity} tokens, holds {prev}, "
                f"cannot add {L}; build it with a larger capacity, or capacity=None to grow"
            )
        if self.keys is None or prev + L > self.keys.shape[2]:
            self._grow(B, H, L, Dk, values.shape[3], keys.dtype)
        self.keys[..., prev : prev + L, :] = keys
        self.values[..., prev : prev + L, :] = values
        self._commit_layout(keys, values)
        self.offset = prev + L
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, B, H, L, Dk, Dv, dtype):
        if self.capacity is not None:
            slots = self.capacity
        else:
            slots = (self.step + L - 1) // self.step * self.step
        new_k = mx.zeros((B, H, slots, Dk), dtype)
        new_v = mx.zeros((B, H, slots, Dv), dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            used_k = self.keys[..., : self.offset, :]
            used_v = self.values[..., : self.offset, :]
            self.keys = mx.concatenate([used_k, new_k], axis=2)
            self.values = mx.concatenate([used_v, new_v], axis=2)

    @property
    def state(self):
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def meta_state(self):
        return {"offset": str(self.offset), "step": str(self.step), "capacity": str(self.capacity)}

    @classmethod
    def from_state(cls, state, meta_state):
        capacity = meta_state.get("capacity", "None")
        cache = cls(step=int(meta_state.get("step", 256)),
                    capacity=None if capacity == "None" else int(capacity))
        if state:
            keys, values = state
            cache.update_and_fetch(keys, values)
        return cache

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = self._trim_count(n)
        self.offset -= n
        return n

    @classmethod
    def conformance_examples(cls, *, head_dim, seq_len):
        return [{}, {"step": 3}, {"capacity": seq_len}]
