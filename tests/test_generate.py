"""The canonical generation loop."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import caches
import sampling
import zoo

PROMPT = [5, 9, 13, 2, 77, 31, 4]


@pytest.fixture(scope="module")
def model():
    return zoo.build("llama", preset="tiny", seed=2)


def greedy_by_uncached_forwards(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(mx.argmax(model(mx.array([seq]))[0, -1]).item())
    return seq[len(prompt):]


def test_yields_max_tokens_greedy_tokens_with_normalised_logprobs(model):
    out = list(zoo.generate_step(model, PROMPT, max_tokens=9))
    assert [t for t, _ in out] == greedy_by_uncached_forwards(model, PROMPT, 9)
    for token, logprobs in out:
        assert logprobs.shape == (model.config.vocab_size,)
        assert abs(mx.logsumexp(logprobs).item()) < 1e-5
        assert mx.argmax(logprobs).item() == token


def test_zero_tokens_yields_nothing(model):
    assert list(zoo.generate_step(model, PROMPT, max_tokens=0)) == []


@pytest.mark.parametrize("cache", ["concat", "preallocated"])
def test_cache_by_name_with_options_or_prebuilt(model, cache):
    by_name = [t for t, _ in zoo.generate_step(model, PROMPT, cache=cache, max_tokens=6)]
    prebuilt = caches.make(cache, model)
    by_list = [t for t, _ in zoo.generate_step(model, PROMPT, cache=prebuilt, max_tokens=6)]
    assert by_name == by_list
    assert prebuilt[0].offset == len(PROMPT) + 5  # the last token is sampled, not fed
    with_options = [t for t, _ in zoo.generate_step(model, PROMPT, cache="preallocated",
                                                    cache_options={"step": 2}, max_tokens=6)]
    assert with_options == by_name


def test_a_warm_cache_continues_the_sequence(model):
    """Prompt reuse: a cache holding a prefix continues exactly like one long prompt."""
    cache = caches.make("preallocated", model)
    model(mx.array([PROMPT[:4]]), cache)
    continued = [t for t, _ in zoo.generate_step(model, PROMPT[4:], cache=cache, max_tokens=5)]
    assert continued == greedy_by_uncached_forwards(model, PROMPT, 5)


def test_padded_vocabulary_is_never_sampled():
    model = zoo.build("gpt2", preset="tiny", seed=4)
    # make the padding rows (90..95) the most likely tokens everywhere
    weight = np.array(model.transformer.wte.weight)
    weight[90:] = 50.0 * weight[:1] + 5.0
    model.transformer.wte.weight = mx.array(weight)
    unmasked = [t for t, _ in zoo.generate_step(model, PROMPT, max_tokens=5)]
    assert any(t >= 90 for t in unmasked)  # the test can fail without masking
    masked = list(zoo.generate_step(model, PROMPT, max_tokens=20, vocab_size=90,
                                    sampler=sampling.make("temperature", temp=5.0, seed=0)))
    assert all(t < 90 for t, _ in masked)
    assert all(np.isneginf(np.array(lp[90:])).all() for _, lp in masked)


def test_seeded_sampling_is_reproducible_and_temperature_zero_is_greedy(model):
    def run(**kw):
        return [t for t, _ in zoo.generate_step(model, PROMPT, max_tokens=12,
                                                sampler=sampling.make("temperature", **kw))]

    assert run(temp=1.5, seed=3) == run(temp=1.5, seed=3)
    assert run(temp=1.5, seed=3) != run(temp=1.5, seed=4)
    assert run(temp=0) == greedy_by_uncached_forwards(model, PROMPT, 12)


def test_logits_processors_see_the_history_and_shape_the_logits(model):
    seen = []

    def ban_last_token(history, logits):
        seen.append(history.tolist())
        banned = mx.arange(logits.shape[-1]) == history[-1]
        return mx.where(banned, -float("inf"), logits)

    out = [t for t, _ in zoo.generate_step(model, PROMPT, max_tokens=6,
                                           logits_processors=[ban_last_token])]
    assert seen[0] == PROMPT
    assert seen[-1] == PROMPT + out[:-1]
    assert all(a != b for a, b in zip([PROMPT[-1]] + out, out))


@pytest.mark.parametrize("prefill_step", [1, 2, 3, 100])
def test_prefill_chunking_does_not_change_tokens(model, prefill_step):
    out = [t for t, _ in zoo.generate_step(model, PROMPT, max_tokens=6, prefill_step=prefill_step)]
    assert out == greedy_by_uncached_forwards(model, PROMPT, 6)
