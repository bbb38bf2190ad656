"""H2O (Zhang et al., 2023): heavy hitters plus a recent window, within a token budget per layer
and key/value head.

Every query's attention weights are added to the keys it read (accumulated attention mass,
summed over queries, and over the query heads that read each key/value head). After each
update, while a layer holds more than `budget` keys, each kv head keeps its `recent` newest and,
of the others, the `budget - recent` with the largest accumulated mass: the selection of H2O's
reference code (FMInference/H2O, h2o_hf/utils_real_drop/modify_llama.py, H2OKVCache_LayerWise:
hh_score per head, topk per head), with the query heads of a group summed as kvpress does for
grouped heads (tests/test_literature.py transcribes both). `per_head=False` sums over every head
of the layer instead: one choice per layer. The evicted keys' memory is freed: a layer holds at
most `budget` keys per head between updates (budget + L while a chunk of L attends).

Exact against its record (caches/eviction.py, VisibilityReference) for any chunking; which keys
are evicted depends on the chunking (a chunk's queries all attend before anything is evicted,
and their scores arrive together), as it does in H2O. Exact against the true model while the
sequence fits in the budget.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .attention import Bias, grouped_scores, grouped_values, head_bias, masked_softmax
from .eviction import EvictionCache, VisibilityReference, check_bool, check_int
from .registry import register


def heavy_hitters(scores: mx.array, budget: int, recent: int) -> mx.array:
    """Indices (ascending in each row) of the keys H2O keeps among S > budget, given their
    accumulated scores [..., S] in position order: the last `recent`, and the budget - recent
    best of the rest (int32 [..., budget])."""
    S = scores.shape[-1]
    older = scores[..., : S - recent]
    heavy = budget - recent
    lead = scores.shape[:-1]
    top = (mx.argpartition(-older, kth=heavy - 1, axis=-1)[..., :heavy] if heavy
           else mx.zeros((*lead, 0), dtype=mx.uint32))
    newest = mx.broadcast_to(mx.arange(S - recent, S, dtype=mx.int32), (*lead, recent))
    return mx.concatenate([mx.sort(top, axis=-1).astype(mx.int32), newest], axis=-1)


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    small = max(2, seq_len // 3)
    return [{"budget": small, "recent": 1}, {"budget": max(3, seq_len // 2), "recent": max(1, seq_len // 6)},
            {"budget": small, "recent": 1, "per_head": False}]


@register("h2o", reference=VisibilityReference, examples=_examples,
          exact=lambda seq_len, budget, recent, per_head: seq_len <= budget)
class H2OCache(EvictionCache):
    """At most `budget` keys per layer and kv head: the `recent` newest and the heaviest hitters
    (module docstring; `per_head=False`: one choice per layer). Memory: 2 * B * n_kv_heads *
    min(offset, budget) * head_dim * itemsize bytes for keys and values, + 4 * B * n_kv_heads *
    (2 * budget + offset) (positions, scores, the record) per layer. Not trimmable once it has
    attended: the accumulated scores hold the attention of the queries a trim would remove."""

    def __init__(self, budget: int = 256, recent: int = 32, per_head: bool = True) -> None:
        super().__init__()
        check_int("h2o", "budget", budget, 1)
        check_int("h2o", "recent", recent, 0)
        check_bool("h2o", "per_head", per_head)
        if recent >= budget:
            raise ValueError(f"h2o cache: recent ({recent}) must be smaller than budget ({budget}), "
                             f"so that some heavy hitters are kept; allowed recent: 0..{budget - 1}")
        self.budget, self.recent, self.per_head = budget, recent, per_head
        self.scores: Optional[mx.array] = None  # float32 [B, Hkv, S]: accumulated attention per kept key

    def attend(self, queries, keys, values, *, scale: float, q_positions: mx.array,
               bias: Optional[Bias] = None) -> mx.array:
        """Attend over every kept key and the chunk, add the weights to the keys' scores, then
        evict down to the budget."""
        keys, values = self.update_and_fetch(keys, values)
        positions = self.positions  # [B, Hkv, S]
        scores = grouped_scores(queries, keys, scale)  # [B, Hq, L, S]
        additive = None if bias is None else head_bias(bias, q_positions, positions, queries.shape[1])
        visible = q_positions[:, None] >= positions[..., None, :]  # [B, Hkv, L, S]: kept keys + the causal chunk
        weights = masked_softmax(scores, visible, additive)
        out = grouped_values(weights.astype(values.dtype), values)
        mass = self._scores(weights)  # [B, Hkv, S]
        if self.scores is not None:
            L = queries.shape[2]
            mass = mass + mx.concatenate([self.scores, mx.zeros((*mass.shape[:2], L), mx.float32)], axis=-1)
        self.scores = mass
        if self.size() > self.budget:
            keep = heavy_hitters(self.scores, self.budget, self.recent)  # [B, Hkv, budget]
            self._evict(keep)
            self.scores = mx.take_along_axis(self.scores, keep, axis=-1)
        return out

    def _trim_refusal(self) -> Optional[str]:
        if self.scores is not None:
            return ("once it has attended: the accumulated attention scores hold the weights of "
                    "the queries a trim would remove")
        return None

    def _trim(self, n):  # before any attention: nothing scored, nothing evicted
        self._forget_newest(n)

    def _extra_state(self):
        return () if self.scores is None else (self.scores,)

    def _restore_extra(self, arrays):
        if len(arrays) > 1 or (arrays and arrays[0].shape != self.positions.shape):
            raise ValueError(f"h2o cache state: scores must be one float array of shape {self.positions.shape}")
        self.scores = arrays[0] if arrays else None
