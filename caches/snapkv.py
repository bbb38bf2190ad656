"""SnapKV (Li et al., 2024): compress the prompt once, from what its last queries attend to.

The cache keeps the queries of the last `window` tokens it saw (the observation window). When
decoding starts (the first single-token update, with more than `budget` keys held), those
queries vote: their attention weights over the keys before the window, summed over the window
queries and over the query heads that read each key/value head (one choice per row and kv
head; `per_head=False`: over every head, one choice per row and layer), smoothed by an average
pool of `kernel_size` (zero-padded, as torch's avg_pool1d), pick the `budget - window` keys
kept besides the window itself. The rule of SnapKV's reference code (FasterDecoding/SnapKV,
snapkv/monkeypatch/snapkv_utils.py, SnapKVCluster.update_kv) and of kvpress's SnapKVPress
(NVIDIA/kvpress, kvpress/presses/snapkv_press.py: the query heads of a group averaged, after
SnapKV issue 22); tests/test_literature.py transcribes both. After that it is a plain growing
cache.

Exact against its record (caches/eviction.py, VisibilityReference) for any chunking. When the
compression happens depends on how the sequence is fed: with single-token prefill steps it
happens as soon as the layer holds more than `budget` keys. Before compressing the cache holds
the whole prompt (SnapKV needs it to score); afterwards min(prompt, budget) + decoded tokens.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .attention import Bias, grouped_scores, masked_softmax
from .eviction import EvictionCache, VisibilityReference, check_bool, check_int
from .registry import register


def pooled_votes(votes: mx.array, kernel_size: int) -> mx.array:
    """torch.nn.functional.avg_pool1d(votes, kernel_size, stride=1, padding=kernel_size // 2)
    over the last axis of votes [..., S] (zero padding counted, odd kernel: S values out)."""
    if kernel_size == 1:
        return votes
    pad = kernel_size // 2
    zeros = mx.zeros((*votes.shape[:-1], pad), votes.dtype)
    padded = mx.concatenate([zeros, votes, zeros], axis=-1)
    sums = mx.concatenate([mx.zeros((*votes.shape[:-1], 1), votes.dtype), mx.cumsum(padded, axis=-1)], axis=-1)
    return (sums[..., kernel_size:] - sums[..., :-kernel_size]) / kernel_size


def snap_selection(votes: mx.array, keep: int, kernel_size: int) -> mx.array:
    """Indices (ascending in each row) of the `keep` keys with the largest pooled votes
    [..., S]: int32 [..., keep]."""
    pooled = pooled_votes(votes, kernel_size)
    top = mx.argpartition(-pooled, kth=keep - 1, axis=-1)[..., :keep]
    return mx.sort(top, axis=-1).astype(mx.int32)


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    return [{"budget": max(3, seq_len // 3), "window": 2, "kernel_size": 3},
            {"budget": max(4, seq_len // 2), "window": 3, "kernel_size": 1},
            {"budget": max(3, seq_len // 3), "window": 2, "kernel_size": 3, "per_head": False}]


@register("snapkv", reference=VisibilityReference, examples=_examples,
          exact=lambda seq_len, budget, window, kernel_size, per_head: seq_len <= budget)
class SnapKVCache(EvictionCache):
    """The prompt compressed to `budget` keys per layer and kv head at the start of decoding, by
    the votes of its last `window` queries (module docstring). Memory: keys and values of
    min(prompt, budget) + decoded tokens, + 4 * B * n_kv_heads * (held + offset) bytes
    (positions, the record) per layer, + the window's queries until compression. Trimmable
    back to where it compressed."""

    def __init__(self, budget: int = 256, window: int = 32, kernel_size: int = 5, per_head: bool = True) -> None:
        super().__init__()
        check_bool("snapkv", "per_head", per_head)
        check_int("snapkv", "budget", budget, 2)
        check_int("snapkv", "window", window, 1)
        check_int("snapkv", "kernel_size", kernel_size, 1)
        if window >= budget:
            raise ValueError(f"snapkv cache: window ({window}) must be smaller than budget ({budget}), "
                             f"so that some prompt keys besides the window are kept")
        if kernel_size % 2 == 0:
            raise ValueError(f"snapkv cache: kernel_size must be odd (a centred pool), got {kernel_size}")
        self.budget, self.window, self.kernel_size, self.per_head = budget, window, kernel_size, per_head
        self.observed: Optional[mx.array] = None  # [B, Hq, <= window, D]: the latest queries
        self.compressed_at: Optional[int] = None  # offset at which it compressed

    def attend(self, queries, keys, values, *, scale: float, q_positions: mx.array,
               bias: Optional[Bias] = None) -> mx.array:
        """Compress first if decoding starts now; keep the queries until then; attend."""
        if (queries.shape[2] == 1 and self.compressed_at is None and self.size() > self.budget
                and self.observed is not None):  # (no queries seen: filled by update_and_fetch)
            self._compress(scale, bias)
        out = super().attend(queries, keys, values, scale=scale, q_positions=q_positions, bias=bias)
        if self.compressed_at is None:
            seen = queries if self.observed is None else mx.concatenate([self.observed, queries], axis=2)
            self.observed = seen[..., -self.window :, :]
        return out

    def _compress(self, scale: float, bias: Optional[Bias]) -> None:
        """Keep the window and the budget - window keys before it that its queries vote for."""
        S = self.size()  # nothing evicted yet: positions 0..S-1
        w = self.observed.shape[2]
        q_positions = mx.arange(S - w, S, dtype=mx.int32)
        k_positions = mx.arange(S, dtype=mx.int32)
        scores = grouped_scores(self.observed, self.keys, scale)  # [B, Hq, w, S]
        additive = None if bias is None else bias(q_positions, k_positions)
        weights = masked_softmax(scores, q_positions[:, None] >= k_positions[None, :], additive)
        votes = self._scores(weights[..., : S - w])  # [B, Hkv, S - w]
        chosen = snap_selection(votes, self.budget - w, self.kernel_size)  # [B, Hkv, budget - w]
        window = mx.broadcast_to(mx.arange(S - w, S, dtype=mx.int32), (*chosen.shape[:2], w))
        self._evict(mx.concatenate([chosen, window], axis=-1))
        self.compressed_at = self.offset
        self.observed = None

    # -- life-cycle ------------------------------------------------------------------------

    def trim(self, n: int) -> int:
        if (self.compressed_at is not None and isinstance(n, int) and not isinstance(n, bool)
                and n > self.offset - self.compressed_at):
            raise ValueError(
                f"SnapKVCache cannot be trimmed by {n}: it compressed the prompt at offset "
                f"{self.compressed_at}, so at most the {self.offset - self.compressed_at} tokens "
                f"since can be removed")
        return super().trim(n)

    def trim_horizon(self) -> Optional[int]:
        return None  # the tokens since the compression can always be trimmed

    def _trim(self, n):
        self._forget_newest(n)  # nothing trimmed was evicted: the newest n stored are the newest n
        if self.observed is not None:
            self.observed = self.observed[..., : max(0, self.observed.shape[2] - n), :]
            if self.observed.shape[2] == 0:
                self.observed = None

    def _extra_state(self):
        at = mx.array([-1 if self.compressed_at is None else self.compressed_at], dtype=mx.int32)
        return (at,) + (() if self.observed is None else (self.observed,))

    def _restore_extra(self, arrays):
        if not 1 <= len(arrays) <= 2 or arrays[0].shape != (1,):
            raise ValueError("snapkv cache state: needs its compression offset (and the window's queries)")
        at = int(arrays[0].item())
        self.compressed_at = None if at < 0 else at
        self.observed = arrays[1] if len(arrays) == 2 else None
