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

import random
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
from hypothesis import assume
from hypothesis import strategies as st

import caches
import positional
import zoo
from caches.reference import StoredReference
from zoo.config import ACTIVATIONS, NORMS

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


# -- the property test's scenarios (tests/test_equivalence.py draws them) --------------------

HEAD_DIMS = [8, 16, 32, 64]
MAX_PROMPT = 20
MAX_DECODE = 8
# Llama 3 frequency scaling with an original context short enough to bend these sequences.
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def chunkings(draw, length: int) -> list[int]:
    """A random split of `length` tokens into consecutive non-empty chunks."""
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=6))) if length > 1 else []
    bounds = [0, *cuts, length]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@st.composite
def blocks(draw) -> dict:
    """The block's parts (None: the family's own) and the model's sliding window: hybrids such
    as GPT-2 with RMSNorm and a SwiGLU MLP, or a Llama with LayerNorm and exact GELU."""
    return dict(
        norm=draw(st.sampled_from([None, *NORMS])),
        activation=draw(st.sampled_from([None, *ACTIVATIONS])),
        gated_mlp=draw(st.sampled_from([None, False, True])),
        qkv_bias=draw(st.sampled_from([None, False, True])),
        out_bias=draw(st.sampled_from([None, False, True])),
        mlp_bias=draw(st.sampled_from([None, False, True])),
        head_bias=draw(st.booleans()),
        sliding_window=draw(st.sampled_from([None, None, 1, 3, 7])),
    )


@st.composite
def scenarios(draw):
    family = draw(st.sampled_from(zoo.available()))
    scheme = draw(st.sampled_from(positional.available()))
    cache_name = draw(st.sampled_from(caches.available()))
    n_heads = draw(st.sampled_from([1, 2, 4, 6]))
    n_kv_heads = draw(st.sampled_from(divisors(n_heads)))  # MHA, GQA and MQA
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    prompt_len = draw(st.integers(1, MAX_PROMPT))
    decode = draw(st.integers(0, MAX_DECODE))
    examples = caches.examples(cache_name, head_dim=head_dim, seq_len=prompt_len + decode + 1)
    assume(examples)  # the cache cannot serve this head size
    return dict(
        family=family,
        config=dict(positional=scheme, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                    n_layers=draw(st.integers(1, 3)), d_model=draw(st.sampled_from([16, 32, 48])),
                    vocab_size=draw(st.integers(8, 80)), d_ff=48, max_positions=64, init_std=0.1,
                    tie_embeddings=draw(st.booleans()),
                    rope_scaling=draw(st.sampled_from([None, LLAMA3_ROPE])) if scheme == "rope" else None,
                    **draw(blocks())),
        cache=cache_name,
        options=draw(st.sampled_from(examples)),
        prompt_len=prompt_len,
        chunks=draw(chunkings(prompt_len + decode)),
        decode=decode,
        prefill_step=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**16)),
    )


def build(s: dict):
    return zoo.build(s["family"], seed=s["seed"], **s["config"])


def run_scenario(s: dict) -> list[str]:
    """Check one scenario; returns what is worth counting (for hypothesis' statistics)."""
    events = []
    model = build(s)
    rng = random.Random(s["seed"])
    vocab = model.config.vocab_size
    tokens = [rng.randrange(vocab) for _ in range(s["prompt_len"] + s["decode"])]

    # 1. Logits at every position, the sequence fed in random chunks (teacher-forced).
    try:
        cache = caches.make(s["cache"], model, **s["options"])
    except caches.Unsupported:  # refused by design, with the reason (streaming on learned positions)
        return [f"{s['cache']} refuses {s['config']['positional']}"]
    got = cached_logits(model, cache, tokens, s["chunks"])
    gap = reference_gap(model, cache, tokens, got)
    assert gap.diff <= TOLERANCE, f"cached logits differ from the reference by {gap.diff:.3g}: {s}"
    if gap.flips:
        events.append("rounding-boundary flip explained")

    # 2. Greedy decoding through the canonical loop vs repeated uncached forwards.
    if s["decode"]:
        result = greedy_against_repeated_forwards(
            model, tokens[: s["prompt_len"]], s["cache"], s["options"], s["decode"], s["prefill_step"],
            tie_tolerance=max(TOLERANCE, 2 * gap.raw) if gap.flips else TOLERANCE)
        if result.ties:
            events.append("greedy tie broken the other way")
    return events
