"""A preallocated cache: write into a buffer, grown in steps or fixed in size."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .base import KeyValueRows
from .registry import register


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    return [{}, {"step": 3}, {"capacity": seq_len}]


@register("preallocated", examples=_examples, ragged=True)
class PreallocatedCache(KeyValueRows):
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
        self._slots = capacity  # capacity + the largest left padding of a ragged batch
        self.keys = None
        self.values = None

    def _check(self, keys, values):
        held, L = self.offset, keys.shape[2]
        if self._slots is not None and held + L > self._slots:
            raise ValueError(
                f"preallocated cache is full: capacity {self.capacity} tokens"
                f"{'' if self._slots == self.capacity else f' (+ {self._slots - self.capacity} slots of left padding)'}, holds {held}, "
                f"cannot add {L}; build it with a larger capacity, or capacity=None to grow"
            )

    def _append(self, keys, values):
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2]:
            self._grow(keys, values)
        self.keys[..., prev : prev + L, :] = keys
        self.values[..., prev : prev + L, :] = values
        return self.keys[..., : prev + L, :], self.values[..., : prev + L, :]

    def _grow(self, keys, values):
        """Make room for `keys`' L tokens: capacity slots at once, else whole steps."""
        B, H, L, Dk = keys.shape
        slots = self._slots if self._slots is not None else (self.step + L - 1) // self.step * self.step
        new_k = mx.zeros((B, H, slots, Dk), keys.dtype)
        new_v = mx.zeros((B, H, slots, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)

    @property
    def state(self):
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _restore(self, state):
        keys, values = state
        if keys.shape[2] != self.offset:
            raise ValueError(f"preallocated cache state holds {keys.shape[2]} tokens, its offset says {self.offset}")
        self.offset = 0
        self._check(keys, values)
        self._append(keys, values)
        self.offset = keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def _prepare_rows(self, padding):
        """A capacity counts each row's tokens: the padded rows get that many slots more."""
        if self.capacity is not None:
            self._slots = self.capacity + max(padding)

    def _extend_rows(self, other, width, padding):
        if self.capacity is not None:  # every row can still hold `capacity` tokens
            self._slots = self.capacity + max(padding)
        super()._extend_rows(other, width, padding)

    def _drop_front(self, n):
        super()._drop_front(n)  # the buffer's free slots past offset stay
        if self._slots is not None:
            self._slots -= n  # what the buffer still holds

    def _trim(self, n):
        pass  # the slots past the new offset are overwritten by the next update
