"""Regression tests named after the KV-cache bugs that motivated kvzoo.

Each bug produced plausible output and passed shape tests. Each test here compares against the
uncached oracle, and each has a twin that re-introduces the bug (monkeypatched) and asserts the
same comparison catches it, so none of these tests can pass vacuously.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import caches
import zoo
from helpers.equivalence import TOLERANCE, cached_logits, max_abs_diff, reference_logits
from positional.learned import LearnedPositional

TOKENS = [3, 17, 42, 8, 8, 61, 5, 29, 33, 2, 14, 50, 7, 7, 19, 40]


def gpt2_learned(**overrides):
    return zoo.build("gpt2", preset="tiny", seed=7, **overrides)


def cached_vs_uncached(model, chunks, cache_name="preallocated") -> float:
    # the cache's own first option set for this model (defaults may not fit: quantized's
    # group_size 64 needs a head size that is a multiple of 64)
    examples = caches.examples(cache_name, head_dim=model.config.head_dim, seq_len=len(TOKENS))
    if not examples:
        pytest.skip(f"{cache_name} cannot serve a model with head size {model.config.head_dim}")
    try:
        cache = caches.make(cache_name, model, **examples[0])
    except caches.Unsupported as refusal:  # refused by design, with its reason (not a failure)
        pytest.skip(str(refusal))
    return max_abs_diff(cached_logits(model, cache, TOKENS, chunks),
                        reference_logits(model, TOKENS, cache[0].reference))


DECODE_CHUNKS = [6] + [1] * 10  # a prefill, then single-token decode steps


# -- mlx-lm's GPT-2 skipped the position embedding for every decoded token (L == 1) -----------

@pytest.mark.parametrize("cache_name", caches.available())
def test_gpt2_decode_steps_get_their_position_embedding(cache_name):
    assert cached_vs_uncached(gpt2_learned(), DECODE_CHUNKS, cache_name) <= TOLERANCE


def test_gpt2_skipped_position_embedding_on_decode_is_caught(monkeypatch):
    embed = LearnedPositional.embed
    monkeypatch.setattr(LearnedPositional, "embed",
                        lambda self, h, positions: h if h.shape[1] == 1 else embed(self, h, positions))
    assert cached_vs_uncached(gpt2_learned(), DECODE_CHUNKS) > 100 * TOLERANCE


def test_decode_positions_come_from_the_cache_offset(monkeypatch):
    seen = []
    embed = LearnedPositional.embed

    def spy(self, h, positions):
        seen.append(positions.tolist())
        return embed(self, h, positions)

    monkeypatch.setattr(LearnedPositional, "embed", spy)
    cached_vs_uncached(gpt2_learned(), [6, 1, 1, 8])
    assert seen[:4] == [list(range(0, 6)), [6], [7], list(range(8, 16))]


# -- a nanoGPT-style model restarted positions at 0 for each new input ------------------------

def test_positions_restarting_at_zero_are_caught(monkeypatch):
    embed = LearnedPositional.embed
    monkeypatch.setattr(LearnedPositional, "embed",
                        lambda self, h, positions: embed(self, h, mx.arange(h.shape[1])))
    assert cached_vs_uncached(gpt2_learned(), DECODE_CHUNKS) > 100 * TOLERANCE


@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_relative_schemes_decode_at_their_absolute_positions(scheme):
    model = zoo.build("llama", preset="tiny", positional=scheme, seed=3)
    assert cached_vs_uncached(model, DECODE_CHUNKS) <= TOLERANCE


def test_rope_offset_restarting_at_zero_is_caught(monkeypatch):
    from positional.rope import RoPE

    rotate = RoPE.rotate
    monkeypatch.setattr(RoPE, "rotate",
                        lambda self, q, k, positions: rotate(self, q, k, positions - positions[0]))
    model = zoo.build("llama", preset="tiny", positional="rope", seed=3)
    assert cached_vs_uncached(model, DECODE_CHUNKS) > 100 * TOLERANCE


# -- a missing causal mask on a multi-token prefill with a non-empty cache ---------------------

CHUNKED_PREFILL = [5, 6, 5]  # the 2nd and 3rd chunks are multi-token with a warm cache


@pytest.mark.parametrize("family", zoo.available())
@pytest.mark.parametrize("cache_name", caches.available())
def test_multi_token_chunk_with_warm_cache_is_causal(family, cache_name):
    model = zoo.build(family, preset="tiny", seed=11)
    assert cached_vs_uncached(model, CHUNKED_PREFILL, cache_name) <= TOLERANCE


def test_later_tokens_in_a_chunk_never_change_earlier_logits():
    """Causality without any oracle: edit the last token of a warm-cache chunk."""
    model = zoo.build("llama", preset="tiny", seed=11)
    edited = TOKENS[:-1] + [(TOKENS[-1] + 1) % model.config.vocab_size]
    a = cached_logits(model, caches.make("preallocated", model), TOKENS, CHUNKED_PREFILL)
    b = cached_logits(model, caches.make("preallocated", model), edited, CHUNKED_PREFILL)
    assert max_abs_diff(a[:-1], b[:-1]) == 0.0
    assert max_abs_diff(a[-1:], b[-1:]) > 0.0


def test_missing_causal_mask_with_warm_cache_is_caught(monkeypatch):
    sdpa = mx.fast.scaled_dot_product_attention

    def no_mask_when_cache_is_warm(q, k, v, *, scale, mask=None):
        return sdpa(q, k, v, scale=scale, mask=None if k.shape[2] > q.shape[2] else mask)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", no_mask_when_cache_is_warm)
    model = zoo.build("llama", preset="tiny", seed=11)
    assert cached_vs_uncached(model, CHUNKED_PREFILL) > 100 * TOLERANCE


# -- positions beyond a learned table were silently wrapped -----------------------------------

def test_positions_past_the_learned_table_raise_not_wrap():
    model = gpt2_learned(max_positions=16)
    cache = caches.make("preallocated", model)
    model(mx.array([TOKENS]), cache)  # positions 0..15: fits exactly
    before = cache[0].offset
    with pytest.raises(ValueError, match=r"past the learned position table of 16 positions"):
        model(mx.array([[1]]), cache)
    assert cache[0].offset == before  # nothing was written
    with pytest.raises(ValueError, match="rope, alibi"):
        model(mx.array([TOKENS + [1]]))  # uncached, 17 positions


def test_generation_past_the_learned_table_raises():
    model = gpt2_learned(max_positions=16)
    steps = zoo.generate_step(model, TOKENS[:10], max_tokens=20)
    emitted = []
    with pytest.raises(ValueError, match="16 positions"):
        for token, _ in steps:
            emitted.append(token)
    # positions 10..15 can be fed, so 7 tokens come out (the 7th predicted at position 15);
    # feeding the 7th at position 16 is the error, raised after it was yielded
    assert len(emitted) == 7
