"""The test suite's own oracle comparisons, written independently of caches.conformance.

Two questions, asked of any model and any cache:

- `cached_logits`: feed tokens through the cache in given chunks; do the logits at every
  position match the uncached forward under the cache's reference?
- `greedy_against_repeated_forwards`: does greedy decoding through the canonical loop emit the
  tokens that greedy decoding by repeated uncached forwards emits?

For a reference that rounds (quantized), `reference_gap` also accepts a miss that is fully
explained by values sitting on a rounding boundary: the cached logits must then equal the
uncached forward over the values the cache stored (caches.reference.StoredReference), and
every stored value must be the reference's rounding of the computed one up to one-step flips
on a boundary (Reference.rounding_flips, tested on its own in tests/test_quantized.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

import caches
import zoo
from caches.reference import StoredReference

TOLERANCE = 1e-4  # fp32 logits


def cached_logits(model, cache: list, tokens: Sequence[int], chunks: Sequence[int]) -> mx.array:
    """Logits [len(tokens), V] from feeding `tokens` through `cache` chunk by chunk."""
    assert sum(chunks) == len(tokens)
    outputs, start = [], 0
    for size in chunks:
        piece = mx.array([list(tokens[start : start + size])], dtype=mx.int32)
        outputs.append(model(piece, cache)[0])
        start += size
    out = mx.concatenate(outputs, axis=0)
    mx.eval(out)
    return out


def reference_logits(model, tokens: Sequence[int], reference) -> mx.array:
    """The uncached oracle: one forward over the whole sequence, [len(tokens), V]."""
    return model(mx.array([list(tokens)], dtype=mx.int32), reference=reference)[0]


def max_abs_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).max().item()


@dataclass
class Gap:
    diff: float  # max |cached - oracle| that decides exactness
    flips: int  # stored values one step off on a rounding boundary (0: plain comparison)
    raw: float  # max |cached - the reference oracle|


def reference_gap(model, cache: list, tokens: Sequence[int], got: mx.array) -> Gap:
    """How far cached logits `got` [len(tokens), V] are from the cache's oracle."""
    reference = cache[0].reference
    raw = max_abs_diff(got, reference_logits(model, tokens, reference))
    if raw <= TOLERANCE or not reference.rounds:
        return Gap(raw, 0, raw)
    oracle = StoredReference(reference, [c.stored_kv() for c in cache])
    diff = max_abs_diff(got, reference_logits(model, tokens, oracle))
    flips, problem = oracle.flips()
    assert problem is None, f"cached logits miss the rounded oracle by {raw:.3g}: {problem}"
    return Gap(diff, flips, raw)


@dataclass
class GreedyResult:
    tokens: list[int]
    ties: int  # steps where the oracle's top two were within tolerance and the cache chose the other


def greedy_against_repeated_forwards(
    model, prompt: list[int], cache_name: str, options: dict, max_tokens: int, prefill_step: int,
    tie_tolerance: float = TOLERANCE,
) -> GreedyResult:
    """Greedy tokens from zoo.generate_step, each checked against a fresh uncached forward.

    At every step the oracle re-runs the whole prefix uncached (under the cache's reference)
    and takes its argmax. A mismatch is allowed only where the oracle's top two logits are
    within tolerance (a tie that float noise may break either way; `tie_tolerance` widens it
    to the deviation rounding-boundary flips were measured to cause); then the comparison
    continues on the cache's choice, so both sides always share the prefix.
    """
    cache = caches.make(cache_name, model, **options)
    emitted = [t for t, _ in zoo.generate_step(model, prompt, cache=cache,
                                                max_tokens=max_tokens, prefill_step=prefill_step)]
    reference = cache[0].reference
    sequence, ties = list(prompt), 0
    for token in emitted:
        logits = reference_logits(model, sequence, reference)[-1]
        choice = mx.argmax(logits).item()
        if choice != token:
            top2 = mx.sort(logits)[-2:]
            gap = (top2[1] - top2[0]).item()
            assert gap <= tie_tolerance and abs(logits[token].item() - logits[choice].item()) <= tie_tolerance, (
                f"greedy diverged at step {len(sequence) - len(prompt)}: cache chose {token}, "
                f"uncached oracle chose {choice} (gap {gap:.3g})"
            )
            ties += 1
        sequence.append(token)
    assert len(emitted) == max_tokens
    return GreedyResult(emitted, ties)
