"""StreamingLLM (Xiao et al., 2024): attention sinks plus a window, at positions inside the cache.

The cache keeps the first `sinks` tokens and the last `window` tokens, with keys stored before
RoPE. Each query attends to the sinks and the window at their places in the cache, 0..size-1,
the query itself last: what the paper does (mit-han-lab/streaming-llm, pos_shift) and what
mlx-lm's rotating cache (absolute positions) and llama.cpp's context shift (keys re-rotated by
the shift) approximate differently. So a stream runs forever on positions below
sinks + window, and the sinks stay at a fixed distance however far the stream has gone.

For query p (absolute position) the cache holds min(p + 1, sinks + window) keys it sees: keys
k < sinks and p - window < k <= p. In the cache a sink sits at k, a window key at
sinks + (k - first) with first = max(sinks, p - window + 1), and the query at
min(p, sinks + window - 1). Window distances are therefore the true ones (p - k); only the
distance to the sinks is shortened. ALiBi measures the same cache distances. Learned absolute
positions are added to the embeddings before any layer, so no cache can move them: refused.

`StreamingReference` says exactly that (`positions_as_seen`), per query, so the uncached oracle
(caches.attention.repositioned_attention) reproduces the cache for any chunking.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .attention import Bias, Rotate, grouped_scores, grouped_values, masked_softmax
from .base import Cache, Fetched, Unsupported
from .registry import register
from .rotating import WindowReference


class StreamingReference(WindowReference):
    """Sinks + window visibility (as `rotating(sinks + window, sinks)`), at cache positions."""

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__(sinks + window, sinks)
        self.sinks = sinks

    def positions_as_seen(self, q_positions, k_positions):
        q = q_positions[:, None]  # [Lq, 1]
        k = k_positions[None, :]  # [1, Lk]
        first = mx.maximum(self.sinks, q - self.window + 1)  # oldest window key query q sees
        k_seen = mx.where(k < self.sinks, k, self.sinks + k - first)  # [Lq, Lk]
        q_seen = mx.minimum(q_positions, self.max_size - 1)  # [Lq]
        return q_seen, k_seen

    def __repr__(self) -> str:
        return f"StreamingReference(sinks={self.sinks}, window={self.window})"


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"streaming cache: {name} must be an int >= {low}, got {value!r}")


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    return [{"sinks": 2, "window": max(1, seq_len // 3)}, {"sinks": 0, "window": max(2, seq_len // 2)}]


@register("streaming", reference=lambda cache: StreamingReference(cache.sinks, cache.window),
          examples=_examples, exact=lambda seq_len, sinks, window: seq_len <= sinks + window)
class StreamingCache(Cache):
    """The first `sinks` tokens and the last `window` tokens, keys stored before RoPE and
    attended at their positions in the cache (module docstring).

    Exact against `StreamingReference(sinks, window)` for any chunking, and against the true
    model while the sequence fits in sinks + window. Memory: 2 * B * n_kv_heads *
    min(offset, sinks + window) * head_dim * itemsize bytes; a prefill chunk of L tokens holds
    L more while it attends.
    """

    rotates_keys = True

    def __init__(self, sinks: int = 4, window: int = 1020) -> None:
        super().__init__()
        _check_int("sinks", sinks, 0)
        _check_int("window", window, 1)
        self.sinks, self.window = sinks, window
        self.keys: Optional[mx.array] = None  # [B, H, S, D] unrotated: sinks, then the window
        self.values: Optional[mx.array] = None

    def check_model(self, model: Any) -> None:
        scheme = getattr(model.positional, "inner", model.positional)  # zoo.shard's head slice wraps it
        base = next(c for c in type(scheme).__mro__ if c.__name__ == "Positional")
        if scheme.max_positions is not None or type(scheme).embed is not base.embed:
            raise Unsupported(
                f"streaming cache: the {scheme.name or type(scheme).__name__} positional scheme adds "
                f"absolute positions to the token embeddings before the first layer, so a cache "
                f"cannot place tokens at their positions in the cache; use it with rope or alibi "
                f"models (or the rotating cache, which keeps absolute positions)")

    @property
    def max_size(self) -> int:
        return self.sinks + self.window

    # -- storage ---------------------------------------------------------------------------

    def _kept(self, offset: int) -> mx.array:
        """Absolute positions held once `offset` tokens were written: sinks, then the window."""
        if offset <= self.max_size:
            return mx.arange(offset, dtype=mx.int32)
        return mx.concatenate([mx.arange(self.sinks, dtype=mx.int32),
                               mx.arange(offset - self.window, offset, dtype=mx.int32)])

    def _append(self, keys, values):
        """Store L tokens before RoPE; return the sinks and, from the window, what the chunk's
        first query sees (from max(sinks, prev - window + 1)) onwards, with the chunk."""
        prev, L = self.offset, keys.shape[2]
        end = prev + L
        all_k = keys if self.keys is None else mx.concatenate([self.keys, keys], axis=2)
        all_v = values if self.values is None else mx.concatenate([self.values, values], axis=2)
        held = mx.concatenate([self._kept(prev), mx.arange(prev, end, dtype=mx.int32)])
        n_sinks = min(self.sinks, prev)  # stored sinks, at the front
        window_start = self.sinks if prev <= self.max_size else prev - self.window  # stored window
        drop = max(0, max(self.sinks, prev - self.window + 1) - window_start) if prev > self.sinks else 0
        if end > self.max_size:  # keep the sinks and the last `window` positions
            n_keep = min(self.sinks, end)
            self.keys = mx.concatenate([all_k[..., :n_keep, :], all_k[..., -self.window:, :]], axis=2)
            self.values = mx.concatenate([all_v[..., :n_keep, :], all_v[..., -self.window:, :]], axis=2)
        else:
            self.keys, self.values = all_k, all_v
        if not drop:
            return Fetched(all_k, all_v, None if end <= self.max_size else held, causal=False)
        cut = n_sinks + drop  # keys no query of this chunk sees
        k, v = (mx.concatenate([a[..., :n_sinks, :], a[..., cut:, :]], axis=2) for a in (all_k, all_v))
        return Fetched(k, v, mx.concatenate([held[:n_sinks], held[cut:]]), causal=False)

    def _positions(self):
        return self._kept(self.offset) if self.offset > self.max_size else None

    def size(self) -> int:
        return min(self.offset, self.max_size)

    # -- attention -------------------------------------------------------------------------

    def attend(self, queries, keys, values, *, scale: float, q_positions: mx.array,
               bias: Optional[Bias] = None, rotate: Optional[Rotate] = None) -> mx.array:
        """Store keys (before RoPE), then attend each query p to the sinks and the window at
        their cache positions: sinks at 0..n-1 with the query at min(p, sinks + window - 1);
        the window and the chunk (contiguous in time) from n on, with their true distances."""
        prev = self.offset
        keys, values = self.update_and_fetch(keys, values)
        positions = self.fetched_positions()  # [S] absolute, ascending
        n_sinks = min(self.sinks, positions.shape[0])
        visible = self.reference.mask(q_positions, positions)  # [L, S]
        B, Hq, L, _ = queries.shape
        parts, biases = [], []
        if n_sinks:
            sink_k, q_sink = keys[..., :n_sinks, :], queries
            q_at = mx.minimum(q_positions, self.max_size - 1)  # [L]
            k_at = mx.arange(n_sinks, dtype=mx.int32)
            if rotate is not None:
                sink_k = rotate(sink_k, k_at)
                q_sink = self._rotate_each(rotate, queries, q_at, prev)
            parts.append(grouped_scores(q_sink, sink_k, scale))
            biases.append(None if bias is None else bias(q_at, k_at))
        if positions.shape[0] > n_sinks:
            first = int(positions[n_sinks].item())
            rest_k, q_rest = keys[..., n_sinks:, :], queries
            q_at = q_positions - first + n_sinks  # cache positions: n_sinks + (x - first)
            k_at = positions[n_sinks:] - first + n_sinks
            if rotate is not None:
                rest_k, q_rest = rotate(rest_k, k_at), rotate(queries, q_at)
            parts.append(grouped_scores(q_rest, rest_k, scale))
            biases.append(None if bias is None else bias(q_at, k_at))
        scores = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]  # [B, Hq, L, S]
        additive = None
        if biases and all(b is not None for b in biases):
            additive = mx.concatenate(
                [mx.broadcast_to(b, (B, Hq, L, part.shape[-1])) for b, part in zip(biases, parts)], axis=-1)
        weights = masked_softmax(scores, visible, additive)
        return grouped_values(weights.astype(values.dtype), values)

    def _rotate_each(self, rotate: Rotate, queries: mx.array, at: mx.array, prev: int) -> mx.array:
        """Queries [B, H, L, D] rotated at `at` = min(p, sinks + window - 1) for p = prev..:
        contiguous up to the limit, then constant (rotated as L sequences of one query)."""
        limit = self.max_size - 1
        L = queries.shape[2]
        below = max(0, min(L, limit - prev))  # queries before the limit: contiguous positions
        pieces = []
        if below:
            pieces.append(rotate(queries[..., :below, :], at[:below]))
        if below < L:
            tail = queries[..., below:, None, :]  # [B, H, n, 1, D]: n sequences of one query
            pieces.append(rotate(tail, mx.array([limit], dtype=mx.int32))[..., 0, :])
        return mx.concatenate(pieces, axis=2) if len(pieces) > 1 else pieces[0]

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        raise NotImplementedError(
            "mlx-lm models rotate keys by their absolute positions before the cache sees them, "
            "so a streaming cache cannot place them at positions in the cache; use it with kvzoo "
            "models (or the rotating cache, mlx-lm's own scheme)")

    # -- life-cycle ------------------------------------------------------------------------

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)

    def _restore(self, state):
        keys, values = state
        self.check_update(keys, values)
        if keys.shape[2] != self.size():
            raise ValueError(f"streaming cache state holds {keys.shape[2]} tokens; offset "
                             f"{self.offset} with sinks {self.sinks} + window {self.window} needs "
                             f"{self.size()}")
        self.keys, self.values = keys, values

    def _trim_refusal(self) -> Optional[str]:
        if self.offset > self.max_size:
            return (f"once tokens have left the window: it holds {self.max_size} of the "
                    f"{self.offset} tokens written, the ones before the window are gone")
        return None

    def trim_horizon(self) -> Optional[int]:
        return self.max_size if self.offset <= self.max_size else 0

    def _trim(self, n):
        keep = self.offset - n
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
