"""H2O (Zhang et al., 2023): heavy hitters plus a recent window, within a token budget per layer.

Every query's attention weights are added to the keys it read (accumulated attention mass,
summed over queries, heads and rows). After each update, while the layer holds more than
`budget` keys, the `recent` newest are kept and, of the others, the `budget - recent` with the
largest accumulated mass: the selection of H2O's reference code (FMInference/H2O,
h2o_hf/utils_real_drop/modify_llama.py, H2OKVCache_LayerWise; tests/test_literature.py
transcribes it). The evicted keys' memory is freed: a layer holds at most `budget` keys between
updates (budget + L while a chunk of L attends).

Exact against its record (caches/eviction.py, VisibilityReference) for any chunking; which keys
are evicted depends on the chunking (a chunk's queries all attend before anything is evicted,
and their scores arrive together), as it does in H2O. Exact against the true model while the
sequence fits in the budget.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .attention import Bias, grouped_scores, grouped_values, masked_softmax
from .eviction import EvictionCache, VisibilityReference, check_int
from .registry import register


def heavy_hitters(scores: mx.array, budget: int, recent: int) -> mx.array:
    """Indices (ascending) of the keys H2O keeps among S > budget, given their accumulated
    scores [S] in position order: the last `recent`, and the budget - recent best of the rest."""
    S = scores.shape[0]
    older = scores[: S - recent]
    heavy = budget - recent
    top = mx.argpartition(-older, kth=heavy - 1)[:heavy] if heavy else mx.array([], dtype=mx.uint32)
    keep = mx.concatenate([mx.sort(top).astype(mx.int32), mx.arange(S - recent, S, dtype=mx.int32)])
    return keep


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    small = max(2, seq_len // 3)
    return [{"budget": small, "recent": 1}, {"budget": max(3, seq_len // 2), "recent": max(1, seq_len // 6)}]


@register("h2o", reference=VisibilityReference, examples=_examples,
          exact=lambda seq_len, budget, recent: seq_len <= budget)
class H2OCache(EvictionCache):
    """At most `budget` keys per layer: the `recent` newest and the heaviest hitters (module
    docstring). Memory: 2 * B * n_kv_heads * min(offset, budget) * head_dim * itemsize bytes
    for keys and values, + 4 * budget (scores) + 4 * offset (the record) per layer. Not
    trimmable once it has attended: the accumulated scores hold the attention of the queries a
    trim would remove."""

    def __init__(self, budget: int = 256, recent: int = 32) -> None:
        super().__init__()
        check_int("h2o", "budget", budget, 1)
        check_int("h2o", "recent", recent, 0)
        if recent >= budget:
            raise ValueError(f"h2o cache: recent ({recent}) must be smaller than budget ({budget}), "
                             f"so that some heavy hitters are kept; allowed recent: 0..{budget - 1}")
        self.budget, self.recent = budget, recent
        self.scores: Optional[mx.array] = None  # float32 [S]: accumulated attention per kept key

    def attend(self, queries, keys, values, *, scale: float, q_positions: mx.array,
               bias: Optional[Bias] = None) -> mx.array:
        """Attend over every kept key and the chunk, add the weights to the keys' scores, then
        evict down to the budget."""
        keys, values = self.update_and_fetch(keys, values)
        positions = self.key_positions()
        scores = grouped_scores(queries, keys, scale)  # [B, Hq, L, S]
        additive = None if bias is None else bias(q_positions, positions)
        visible = q_positions[:, None] >= positions[None, :]  # kept keys + the causal chunk
        weights = masked_softmax(scores, visible, additive)
        out = grouped_values(weights.astype(values.dtype), values)
        mass = self.across_heads(weights.astype(mx.float32).sum(axis=(0, 1, 2)))  # [S], every head (zoo.shard)
        L = queries.shape[2]
        if self.scores is not None:
            mass = mass + mx.concatenate([self.scores, mx.zeros((L,), mx.float32)])
        self.scores = mass
        if self.size() > self.budget:
            keep = heavy_hitters(self.scores, self.budget, self.recent)
            self._evict(keep)
            self.scores = self.scores[keep]
        return out

    def _trim_refusal(self) -> Optional[str]:
        if self.scores is not None:
            return ("once it has attended: the accumulated attention scores hold the weights of "
                    "the queries a trim would remove")
        return None

    def _trim(self, n):  # before any attention: nothing scored, nothing evicted
        keep = self.size() - n
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
        self.positions = self.positions[:keep]
        self.evicted_at = self.evicted_at[: self.offset - n]

    def _extra_state(self):
        return () if self.scores is None else (self.scores,)

    def _restore_extra(self, arrays):
        if len(arrays) > 1 or (arrays and arrays[0].shape != (self.size(),)):
            raise ValueError(f"h2o cache state: scores must be one float array of {self.size()} values")
        self.scores = arrays[0] if arrays else None
