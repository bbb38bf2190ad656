"""The heart of the mission: every pairing preserves the uncached model's outputs.

For random model configs (family, positional scheme, MHA/GQA/MQA, layers, head size), random
tokens, random prefill chunking and decode lengths, and every registered cache (with the option
sets the cache itself declares in `conformance_examples`), the cached logits at every position
match the uncached forward under the cache's reference, and greedy decoding through the
canonical loop emits the tokens repeated uncached forwards emit. A newly registered cache is
covered with no edit here.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import caches
import positional
import zoo
from equivalence import (
    TOLERANCE,
    cached_logits,
    greedy_against_repeated_forwards,
    reference_gap,
)

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
def scenarios(draw):
    family = draw(st.sampled_from(zoo.available()))
    scheme = draw(st.sampled_from(positional.available()))
    cache_name = draw(st.sampled_from(caches.available()))
    n_heads = draw(st.sampled_from([1, 2, 4, 6]))
    n_kv_heads = draw(st.sampled_from(divisors(n_heads)))  # MHA, GQA and MQA
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    prompt_len = draw(st.integers(1, MAX_PROMPT))
    decode = draw(st.integers(0, MAX_DECODE))
    examples = caches.get(cache_name).conformance_examples(
        head_dim=head_dim, seq_len=prompt_len + decode + 1)
    assume(examples)  # the cache cannot serve this head size
    return dict(
        family=family,
        config=dict(positional=scheme, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                    n_layers=draw(st.integers(1, 3)), d_model=draw(st.sampled_from([16, 32, 48])),
                    vocab_size=draw(st.integers(8, 80)), d_ff=48, max_positions=64, init_std=0.1,
                    tie_embeddings=draw(st.booleans()),
                    rope_scaling=draw(st.sampled_from([None, LLAMA3_ROPE])) if scheme == "rope" else None),
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
    cache = caches.make(s["cache"], model, **s["options"])
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


@settings(max_examples=600)
@given(scenarios())
def test_every_pairing_preserves_the_reference_outputs(s):
    for name in run_scenario(s):
        event(name)


GRID = [
    (family, scheme, cache_name, n_kv_heads)
    for family in zoo.available()
    for scheme in positional.available()
    for cache_name in caches.available()
    for n_kv_heads in (4, 2, 1)
]


@pytest.mark.parametrize("family,scheme,cache_name,n_kv_heads", GRID)
def test_grid_every_registered_pairing(family, scheme, cache_name, n_kv_heads):
    """Each family x scheme x cache x layout at least once, with every declared option set."""
    for options in caches.get(cache_name).conformance_examples(head_dim=32, seq_len=30):
        s = dict(family=family, cache=cache_name, options=options, prompt_len=18, decode=12,
                 chunks=[7, 1, 1, 9, 1, 11], prefill_step=5, seed=len(GRID),
                 config=dict(positional=scheme, n_heads=4, n_kv_heads=n_kv_heads, head_dim=32,
                             n_layers=2, d_model=32, vocab_size=64, d_ff=64, max_positions=64,
                             init_std=0.1))
        run_scenario(s)
