"""A rotating-window cache: `keep` attention sinks plus the most recent tokens, in a ring buffer.

Slot layout (max_size slots, W = max_size - keep ring slots):

    slots 0 .. keep-1             positions 0 .. keep-1, forever (the sinks)
    slot keep + (p - keep) % W    position p >= keep, until p + W overwrites it

So where a position lives is arithmetic, and `key_positions()` reports it without tracking
anything per slot: ALiBi and the window mask stay correct when the ring has wrapped and the
slots are out of time order (the bug of rolling a cache and forgetting the positions).
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .base import Cache, Fetched
from .reference import Reference
from .registry import register


class WindowReference(Reference):
    """Sliding-window visibility with sinks: query p sees key s iff s <= p and
    (s < keep or s > p - (max_size - keep))."""

    def __init__(self, max_size: int, keep: int) -> None:
        self.max_size = max_size
        self.keep = keep
        self.window = max_size - keep

    def mask(self, q_positions: mx.array, k_positions: mx.array) -> mx.array:
        q = q_positions[..., :, None]
        k = k_positions[..., None, :]
        return (k <= q) & ((k < self.keep) | (k > q - self.window))

    def __repr__(self) -> str:
        return f"WindowReference(max_size={self.max_size}, keep={self.keep})"


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"rotating cache: {name} must be an int >= {low}, got {value!r}")


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    small = max(2, seq_len // 3)  # wraps: seq_len > small
    return [
        {"max_size": max(1, seq_len // 3), "keep": 0},
        {"max_size": small, "keep": min(2, small - 1)},
        {"max_size": seq_len, "keep": min(4, seq_len - 1)},  # fits: exact vs the true model
    ]


DEFAULT_KEEP = 4  # attention sinks when keep is not given (at most max_size - 1)


@register("rotating", reference=lambda cache: WindowReference(cache.max_size, cache.keep),
          examples=_examples, exact=lambda seq_len, max_size, keep: seq_len <= max_size, ragged=True)
class RotatingCache(Cache):
    """At most `max_size` tokens: the first `keep` (attention sinks) and the last
    `max_size - keep` (mlx-lm's RotatingKVCache, exact for every prefill chunking).

    Exact against `WindowReference(max_size, keep)` always, and against the true uncached
    model while the sequence fits in `max_size`. Decoding writes one slot in place; a prefill
    chunk of L tokens attends to sinks + the last W-1 stored tokens + its own L keys (a
    transient max_size - 1 + L slots), then stores only what the window keeps.
    Memory: 2 * B * n_kv_heads * min(offset, max_size) * head_dim * itemsize bytes (the buffer
    grows `step` slots at a time up to max_size, then stays constant however long the run).
    """

    step = 256

    def __init__(self, max_size: int = 4096, keep: Optional[int] = None) -> None:
        super().__init__()
        _check_int("max_size", max_size, 1)
        if keep is None:  # the default: 4 sinks, fewer when the window is too small for them
            keep = min(DEFAULT_KEEP, max_size - 1)
        _check_int("keep", keep, 0)
        if keep >= max_size:
            raise ValueError(
                f"rotating cache: keep ({keep}) must be smaller than max_size ({max_size}), "
                f"so at least one slot holds recent tokens; allowed keep: 0..{max_size - 1}"
            )
        self.max_size = max_size
        self.keep = keep
        self.window = max_size - keep  # W: ring slots for the most recent tokens
        # Slots in storage: max_size and keep, each grown by the largest left padding of a
        # ragged batch (_prepare_rows), so that every row's sinks stay stored.
        self._slots, self._sinks = max_size, keep
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    # -- storage ---------------------------------------------------------------------------
    def _prepare_rows(self, padding):
        """Rows left-padded by up to P slots: row b's sinks (its positions 0..keep-1) sit at
        slots padding[b]..padding[b]+keep-1 of the padded sequence. So the first keep + P slots
        are kept as sinks and the ring keeps its W slots: every row still holds its sinks and
        its last W tokens; what else is stored (padding, a row's tokens past its window) is
        hidden by the mask, WindowReference on each row's own positions. P more slots per row:
        the padding's cost."""
        extra = max(padding)
        self._slots, self._sinks = self.max_size + extra, self.keep + extra

    def _select_rows(self, index):
        self._take_rows(index, "keys", "values")

    def _slot(self, position: int) -> int:
        if position < self._sinks:
            return position
        return self._sinks + (position - self._sinks) % self.window

    @property
    def wrapped(self) -> bool:
        """True once a token has left the window (then slots are out of time order)."""
        return self.offset > self._slots

    def _reserve(self, slots: int, keys: mx.array, values: mx.array) -> None:
        """Make the buffer hold at least `slots` slots (grown by `step`, capped at max_size)."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if slots <= have:
            return
        size = min(self._slots, (slots + self.step - 1) // self.step * self.step)
        B, H, _, Dk = keys.shape
        new_k = mx.zeros((B, H, size - have, Dk), keys.dtype)
        new_v = mx.zeros((B, H, size - have, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :have, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :have, :], new_v], axis=2)

    def _write(self, first_position: int, keys: mx.array, values: mx.array) -> None:
        """Store tokens first_position .. +L-1 ([B, H, L, D]) in their slots; L <= W + keep,
        and only positions the window keeps (sinks or the last W) may be passed."""
        position, index, L = first_position, 0, keys.shape[2]
        while index < L:  # at most three contiguous pieces: sinks, ring end, ring start
            slot = self._slot(position)
            end = self._sinks if position < self._sinks else self._slots
            n = min(L - index, end - slot)
            self.keys[..., slot : slot + n, :] = keys[..., index : index + n, :]
            self.values[..., slot : slot + n, :] = values[..., index : index + n, :]
            position, index = position + n, index + n

    def _append(self, keys, values):
        prev, L = self.offset, keys.shape[2]
        if prev + L <= self._slots or L == 1:
            # Fits before the wrap, or one decoded token: write in place, return the buffer.
            self._reserve(min(prev + L, self._slots), keys, values)
            self._write(prev, keys, values)
            n = min(prev + L, self._slots)
            stored_k, stored_v = self.keys[..., :n, :], self.values[..., :n, :]
            if prev + L <= self._slots:
                return stored_k, stored_v  # positions 0..prev+L-1 in order; nothing hidden
            # One query over the whole ring: it sees every stored slot.
            return Fetched(stored_k, stored_v, lambda: self._ring_positions(prev + 1), causal=True)
        return self._chunk_across_wrap(keys, values)

    def _chunk_across_wrap(self, keys, values):
        """A chunk of L > 1 tokens that crosses max_size.

        Its first query (position prev) must see the sinks and the W-1 tokens before it, so
        those are returned with all L new keys (the mask does the rest); then only the sinks
        and the last W tokens are stored.
        """
        prev, L = self.offset, keys.shape[2]
        n_sinks = min(self._sinks, prev)
        first = min(prev, max(self._sinks, prev - self.window + 1))  # oldest window token it sees
        pieces_k, pieces_v = [], []
        if self.keys is not None:
            for start, stop in [(0, n_sinks)] * (n_sinks > 0) + self._ring_runs(first, prev):
                pieces_k.append(self.keys[..., start:stop, :])
                pieces_v.append(self.values[..., start:stop, :])
        out_k = mx.concatenate(pieces_k + [keys], axis=2)
        out_v = mx.concatenate(pieces_v + [values], axis=2)
        positions = self._chunk_positions(prev, L)

        # Store: new sinks (positions < keep), then the last W positions of the sequence.
        end = prev + L
        self._reserve(self._slots, keys, values)
        if prev < self._sinks:
            n = min(self._sinks, end) - prev
            self._write(prev, keys[..., :n, :], values[..., :n, :])
        tail = max(self._sinks, end - self.window, prev)  # first new position the window keeps
        if tail < end:
            self._write(tail, keys[..., tail - prev :, :], values[..., tail - prev :, :])
        return Fetched(out_k, out_v, positions, causal=False)

    def _chunk_positions(self, prev: int, L: int) -> mx.array:
        """Positions a chunk of L tokens after `prev` fetches: sinks, the W-1 stored tokens
        before it that its first query still sees, then the chunk itself."""
        n_sinks = min(self._sinks, prev)
        first = min(prev, max(self._sinks, prev - self.window + 1))  # oldest window token it sees
        return mx.concatenate([
            mx.arange(n_sinks, dtype=mx.int32),
            mx.arange(first, prev + L, dtype=mx.int32),  # the kept window, then the chunk
        ])

    def _ring_runs(self, first: int, stop: int) -> list[tuple[int, int]]:
        """Slot ranges holding positions first..stop-1 (all in the ring) in time order."""
        if first >= stop:
            return []
        start = self._slot(first)
        n = stop - first
        head = min(n, self._slots - start)
        runs = [(start, start + head)]
        if head < n:
            runs.append((self._sinks, self._sinks + n - head))
        return runs

    def _ring_positions(self, offset: int) -> mx.array:
        """Position held by each slot once `offset` tokens were written past the wrap."""
        # Ring slot keep + r holds the latest position p <= offset-1 with (p - keep) % W == r.
        last = offset - 1
        r = mx.arange(self.window, dtype=mx.int32)
        ring = last - (last - self._sinks - r) % self.window  # last - keep - r >= 0 once wrapped
        return mx.concatenate([mx.arange(self._sinks, dtype=mx.int32), ring])

    def _positions(self):
        return self._ring_positions(self.offset) if self.wrapped else None

    def _upcoming(self, n: int):
        if self.offset + n <= self._slots:
            return None, True
        if n == 1:
            return self._ring_positions(self.offset + 1), True
        return self._chunk_positions(self.offset, n), False

    # -- life-cycle ------------------------------------------------------------------------

    def size(self) -> int:
        return min(self.offset, self._slots)

    @property
    def state(self):
        if self.keys is None:
            return ()
        n = self.size()
        return self.keys[..., :n, :], self.values[..., :n, :]

    def _restore(self, state):
        keys, values = state
        self.check_update(keys, values)
        if keys.shape[2] != min(self.offset, self._slots):
            raise ValueError(
                f"rotating cache state holds {keys.shape[2]} slots; offset {self.offset} with "
                f"max_size {self._slots} needs {min(self.offset, self._slots)}")
        self.keys, self.values = keys, values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def _trim_refusal(self) -> Optional[str]:
        if self.wrapped:
            return (f"once it has wrapped: it holds {self.offset} tokens' worth of positions in "
                    f"{self._slots} slots, so the tokens before the window are gone")
        return None

    def trim_horizon(self) -> Optional[int]:
        return self._slots if not self.wrapped else 0

    def _trim(self, n):
        pass  # before the wrap, slots past the new offset are simply overwritten later
