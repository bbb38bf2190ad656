"""The compiled decode step (zoo/runtime/compiled.py) gives what the plain step gives.

Oracle: the uncached forward over the whole sequence (log-softmax of its last position) for
every generated token; and the plain step (KVZOO_COMPILE=off) token for token. Covered: both
families, RoPE / ALiBi / learned positions, MHA / GQA / MQA, a model's own sliding window, a
buffer that grows during decoding (the step that fills it runs plain, the next shape is traced
anew), a learned position table running out, a warm cache, stories260K, and that the compiled
path really ran (and did not for caches it does not serve).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import caches
import zoo
from helpers.assets import require_asset
from zoo.runtime import compiled
from zoo.runtime.compiled import CompiledDecoder

PROMPT = [5, 9, 13, 2, 77, 31, 4]


@pytest.fixture
def calls(monkeypatch):
    """Counts compiled steps taken; the environment decides whether they may run."""
    count = {"n": 0}
    original = CompiledDecoder.__call__

    def spy(self, token, layer_caches):
        count["n"] += 1
        return original(self, token, layer_caches)

    monkeypatch.setattr(CompiledDecoder, "__call__", spy)
    return count


def decode(model, prompt, n, monkeypatch, flag, **options):
    monkeypatch.setenv(compiled.ENV_VAR, flag)
    out = list(zoo.generate_step(model, prompt, max_tokens=n, **options))
    return [t for t, _ in out], np.stack([np.array(lp) for _, lp in out])


def uncached_logprobs(model, prompt, tokens):
    seq, rows = list(prompt), []
    for token in tokens:
        logits = model(mx.array([seq]))[0, -1]
        rows.append(np.array(logits - mx.logsumexp(logits)))
        seq.append(token)
    return np.stack(rows)


CASES = {
    "llama-rope-gqa": dict(family="llama"),
    "llama-alibi-mqa": dict(family="llama", positional="alibi", n_kv_heads=1),
    "llama-rope-mha-window": dict(family="llama", n_kv_heads=4, sliding_window=6),
    "gpt2-learned": dict(family="gpt2"),
    "gpt2-rope-gqa": dict(family="gpt2", positional="rope", n_kv_heads=2),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_decode_equals_the_plain_step_and_the_uncached_model(case, monkeypatch, calls):
    options = dict(CASES[case])
    model = zoo.build(options.pop("family"), preset="tiny", seed=4, **options)
    # step=4: the buffer fills and grows several times within the decode
    kw = dict(cache="preallocated", cache_options={"step": 4})
    plain_tokens, plain = decode(model, PROMPT, 14, monkeypatch, "off", **kw)
    assert calls["n"] == 0
    fast_tokens, fast = decode(model, PROMPT, 14, monkeypatch, "auto", **kw)
    assert calls["n"] >= 8  # most steps ran compiled; the ones that grew the buffer ran plain
    assert fast_tokens == plain_tokens
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast, uncached_logprobs(model, PROMPT, fast_tokens), atol=1e-4, rtol=0)


def test_a_warm_cache_and_a_fixed_capacity_continue_exactly(monkeypatch, calls):
    model = zoo.build("llama", preset="tiny", seed=5)
    results = []
    for flag in ("off", "auto"):
        monkeypatch.setenv(compiled.ENV_VAR, flag)
        cache = caches.make("preallocated", model, capacity=32)
        model(mx.array([PROMPT[:4]]), cache)
        out = list(zoo.generate_step(model, PROMPT[4:], cache=cache, max_tokens=10))
        results.append(([t for t, _ in out], np.stack([np.array(lp) for _, lp in out]), cache[0].offset))
    (plain_tokens, plain, plain_offset), (fast_tokens, fast, fast_offset) = results
    assert calls["n"] == 10 and fast_tokens == plain_tokens and fast_offset == plain_offset == 4 + 3 + 9
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=0)


def test_running_out_of_learned_positions_stops_both_paths_alike(monkeypatch, calls):
    model = zoo.build("gpt2", preset="tiny", seed=6, max_positions=12)
    outcomes = []
    for flag in ("off", "auto"):
        monkeypatch.setenv(compiled.ENV_VAR, flag)
        tokens = []
        with pytest.raises(ValueError, match="position") as error:
            for token, _ in zoo.generate_step(model, PROMPT, max_tokens=20):
                tokens.append(token)
        outcomes.append((tokens, str(error.value)))
    assert outcomes[0] == outcomes[1] and len(outcomes[0][0]) == 12 - len(PROMPT) + 1
    assert calls["n"] > 0


@pytest.mark.parametrize("cache,options", [("concat", {}), ("rotating", {}), ("quantized", {"group_size": 32}),
                                           ("preallocated", {"capacity": 1024})])  # mostly empty: plain
def test_other_caches_take_the_plain_step(cache, options, monkeypatch, calls):
    model = zoo.build("llama", preset="tiny", seed=7)
    monkeypatch.setenv(compiled.ENV_VAR, "auto")
    list(zoo.generate_step(model, PROMPT, cache=cache, cache_options=options, max_tokens=4))
    assert calls["n"] == 0


def test_stories260k_greedy_story_is_the_same(monkeypatch, calls):
    model = zoo.load_model(require_asset("stories260K/stories260K.gguf"))
    prompt = [1, 403, 407, 261, 378, 365, 351]  # BOS + a few pieces of the vocabulary
    plain_tokens, plain = decode(model, prompt, 40, monkeypatch, "off")
    fast_tokens, fast = decode(model, prompt, 40, monkeypatch, "auto")
    assert calls["n"] == 40 and fast_tokens == plain_tokens
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=1e-6)  # float32 summation order
    np.testing.assert_allclose(fast[::8], uncached_logprobs(model, prompt, fast_tokens)[::8], atol=1e-4, rtol=0)
