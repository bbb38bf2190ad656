"""Speculative decoding equals plain decoding.

Greedy: for random families x positional schemes x caches x drafters (prompt lookup of several
n-gram sizes, an unrelated random draft model, the model drafting for itself) x draft lengths,
the speculative tokens are plain greedy decoding's, token for token, with the same cache.
Sampling: the tokens follow the model's own sampling distribution (chi-square against the exact
probabilities computed from the model, at a fixed seed and sample count). Caches that cannot
roll back for the whole run are refused before anything runs.
"""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import caches
import sampling
import zoo
from helpers.assets import require_module
from zoo.speculative import SpeculativeStats

TOLERANCE = 1e-4


def plain_greedy(model, prompt, n, cache, options, processors=None):
    out = list(zoo.generate_step(model, prompt, max_tokens=n, cache=cache, cache_options=options,
                                 logits_processors=processors))
    return [t for t, _ in out], [lp for _, lp in out]


def agree_up_to_ties(plain, plain_logprobs, spec) -> bool:
    """Equal tokens, except from a step where plain's top two log-probs are within float noise
    (then either choice is right and the sequences may part)."""
    for i, (a, b) in enumerate(zip(plain, spec)):
        if a != b:
            top2 = mx.sort(plain_logprobs[i])[-2:]
            return (top2[1] - top2[0]).item() <= TOLERANCE
    return len(plain) == len(spec)


@st.composite
def scenarios(draw):
    family = draw(st.sampled_from(zoo.available()))
    scheme = draw(st.sampled_from(["learned", "rope", "alibi"]))
    n_heads = draw(st.sampled_from([2, 4]))
    n_kv_heads = draw(st.sampled_from([n_heads, 1]))
    cache = draw(st.sampled_from(["concat", "preallocated", "quantized", "rotating"]))
    max_tokens = draw(st.integers(1, 14))
    prompt_len = draw(st.integers(1, 10))
    options = {}
    if cache == "rotating":  # a window that never wraps during the run: trimmable throughout
        options = {"max_size": prompt_len + max_tokens + 8, "keep": 2}
    elif cache == "quantized":
        options = {"bits": draw(st.sampled_from([4, 8])), "group_size": 32}
    drafter = draw(st.sampled_from(["lookup", "draft-model", "self"]))
    return dict(family=family, scheme=scheme, n_heads=n_heads, n_kv_heads=n_kv_heads, cache=cache,
                options=options, max_tokens=max_tokens, prompt_len=prompt_len, drafter=drafter,
                ngram=draw(st.integers(1, 3)), num_draft=draw(st.integers(1, 5)),
                seed=draw(st.integers(0, 2**16)), repeat=draw(st.booleans()),
                penalty=draw(st.sampled_from([None, 1.5])))


@settings(max_examples=200)
@given(scenarios())
def test_speculative_greedy_equals_plain_greedy(s):
    config = dict(positional=s["scheme"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], head_dim=32,
                  d_model=32, n_layers=2, vocab_size=40, d_ff=48, max_positions=64, init_std=0.3)
    model = zoo.build(s["family"], seed=s["seed"], **config)
    rng = random.Random(s["seed"])
    if s["repeat"]:  # a prompt that repeats itself: lookup finds matches
        unit = [rng.randrange(40) for _ in range(3)]
        prompt = (unit * 4)[: s["prompt_len"]]
    else:
        prompt = [rng.randrange(40) for _ in range(s["prompt_len"])]
    processors = sampling.make_logits_processors(repetition_penalty=s["penalty"])  # per-position history
    plain, plain_lp = plain_greedy(model, prompt, s["max_tokens"], s["cache"], s["options"], processors)
    kwargs = {"lookup": dict(prompt_lookup=s["ngram"]),
              "draft-model": dict(draft=zoo.build(s["family"], seed=s["seed"] + 1, **{**config, "n_layers": 1})),
              "self": dict(draft=model, draft_cache=caches.make(s["cache"], model, **s["options"]))}[s["drafter"]]
    stats = SpeculativeStats()
    spec = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=s["max_tokens"], cache=s["cache"],
                                            cache_options=s["options"], num_draft=s["num_draft"],
                                            logits_processors=processors, speculative_stats=stats, **kwargs)]
    assert agree_up_to_ties(plain, plain_lp, spec), (plain, spec, s)
    assert stats.emitted == s["max_tokens"]
    if s["drafter"] == "self" and caches.exact_for(s["cache"]) and s["penalty"] is None:
        assert stats.accepted == stats.drafted  # drafting for itself (same cache, raw logits) it is right


def test_every_round_rolls_back_exactly_what_was_rejected():
    """After generation the cache holds exactly the tokens plain decoding would have fed."""
    from mlx.utils import tree_map

    model = zoo.build("llama", preset="tiny", seed=4)
    draft = zoo.build("llama", preset="tiny", seed=4)  # the model's weights, perturbed: agrees often, not always
    noise = iter(range(10**6))
    draft.update(tree_map(lambda w: w * (1 + 0.6 * mx.random.normal(w.shape, key=mx.random.key(next(noise)))),
                          draft.parameters()))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain_cache, spec_cache = caches.make("preallocated", model), caches.make("preallocated", model)
    list(zoo.generate_step(model, prompt, max_tokens=20, cache=plain_cache))
    stats = SpeculativeStats()
    list(zoo.generate_step(model, prompt, max_tokens=20, cache=spec_cache, draft=draft, num_draft=4,
                           speculative_stats=stats))
    assert stats.drafted > stats.accepted > 0  # some rejected, some accepted: real rollbacks
    assert spec_cache[0].offset == plain_cache[0].offset
    for a, b in zip(plain_cache, spec_cache):
        assert mx.abs(a.state[0] - b.state[0]).max().item() <= 1e-5


def test_prompt_lookup_accepts_on_text_that_repeats_its_prompt():
    model = zoo.build("gpt2", preset="tiny", seed=2)
    prompt = [7, 8, 9, 10] * 6
    stats = SpeculativeStats()
    spec = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=24, prompt_lookup=3, speculative_stats=stats)]
    plain, _ = plain_greedy(model, prompt, 24, None, None)
    assert spec == plain
    assert stats.rounds < 24  # more than one token per forward on average


# -- refusals --------------------------------------------------------------------------------


def test_a_cache_that_would_wrap_is_refused_before_anything_runs():
    model = zoo.build("llama", preset="tiny")
    cache = caches.make("rotating", model, max_size=16, keep=2)
    with pytest.raises(ValueError, match="stays trimmable only up to 16 tokens"):
        next(zoo.generate_step(model, [1, 2, 3], cache=cache, max_tokens=20, prompt_lookup=2))
    assert cache[0].offset == 0


def test_a_cache_that_cannot_trim_is_refused(registered):
    from helpers.user_caches import NewestFirstCache

    registered("test-no-trim", NewestFirstCache)
    model = zoo.build("llama", preset="tiny")
    with pytest.raises(ValueError, match="cannot be trimmed at all"):
        next(zoo.generate_step(model, [1, 2, 3], cache="test-no-trim", max_tokens=5, prompt_lookup=2))
    draft = zoo.build("llama", preset="tiny", seed=3)
    with pytest.raises(ValueError, match="draft model's cache"):
        next(zoo.generate_step(model, [1, 2, 3], max_tokens=5, draft=draft, draft_cache="test-no-trim"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup=0), "prompt_lookup must be an int >= 1"),
    (dict(prompt_lookup=2, num_draft=0), "num_draft must be an int >= 1"),
    (dict(prompt_lookup=2, sampler=lambda lp: mx.argmax(lp, -1)), "needs the distribution"),
    (dict(draft="model.gguf"), "draft must be a zoo model"),
])
def test_bad_speculative_options_are_clear_errors(kwargs, message):
    model = zoo.build("llama", preset="tiny")
    with pytest.raises((ValueError, TypeError), match=message):
        next(zoo.generate_step(model, [1, 2, 3], max_tokens=5, **kwargs))


def test_a_draft_model_with_a_smaller_vocabulary_is_refused():
    model = zoo.build("llama", preset="tiny")
    draft = zoo.build("llama", preset="tiny", vocab_size=50)
    with pytest.raises(ValueError, match="must share the tokenizer"):
        next(zoo.generate_step(model, [1, 2, 3], max_tokens=5, draft=draft))


# -- sampling keeps the model's distribution -------------------------------------------------


def exact_probabilities(model, sampler, prompt) -> tuple[np.ndarray, np.ndarray]:
    """p(t1 | prompt) [V] and p(t2 | prompt, t1) [V, V] under the sampler's distribution."""
    logits = model(mx.array([prompt]))[0, -1]
    p1 = np.array(sampler.distribution((logits - mx.logsumexp(logits))[None])[0], dtype=np.float64)
    V = p1.size
    rows = mx.array([prompt + [t] for t in range(V)])
    logits2 = model(rows)[:, -1]
    p2 = np.array(sampler.distribution(logits2 - mx.logsumexp(logits2, axis=-1, keepdims=True)), dtype=np.float64)
    return p1, p1[:, None] * p2


def chi_square_p_value(counts: np.ndarray, expected: np.ndarray, torch) -> float:
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was drawn"
    e = expected[keep] * counts.sum()
    stat = float(((counts[keep] - e) ** 2 / e).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("drafter,sampler_options", [
    ("draft-model", dict(temp=1.0, top_k=5)),  # filters too: p is the filtered distribution
    ("lookup", dict(temp=1.3)),  # every token possible, so the looked-up one is accepted sometimes
])
def test_speculative_sampling_keeps_the_models_distribution(drafter, sampler_options):
    torch = require_module("torch")
    config = dict(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=16, max_positions=32,
                  init_std=0.5)
    model = zoo.build("llama", seed=11, **config)
    draft = zoo.build("llama", seed=12, **config)  # a different distribution: many rejections
    prompt = [1, 2, 1, 2, 1]  # lookup proposes 2, then 1 (a point-mass draft)
    p1, p12 = exact_probabilities(model, sampling.make_sampler(**sampler_options), prompt)
    first, pairs = np.zeros(6), np.zeros((6, 6))
    stats = SpeculativeStats()
    kwargs = dict(draft=draft) if drafter == "draft-model" else dict(prompt_lookup=2)
    for seed in range(1500):
        sampler = sampling.make_sampler(**sampler_options, seed=seed)
        a, b = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=2, sampler=sampler, num_draft=2,
                                               speculative_stats=stats, **kwargs)]
        first[a] += 1
        pairs[a, b] += 1
    assert 0 < stats.accepted < stats.drafted  # both the accept and the reject branches ran
    assert chi_square_p_value(first, p1, torch) > 1e-3
    assert chi_square_p_value(pairs.ravel(), p12.ravel(), torch) > 1e-3


# -- the command line ------------------------------------------------------------------------


def test_kvzoo_generate_speculative_prints_the_plain_reply(capsys):
    from helpers.assets import require_asset
    from zoo.cli import main

    gguf = str(require_asset("stories260K/stories260K.gguf"))
    base = ["generate", "--model", gguf, "--prompt", "Once upon a time", "--max-tokens", "40"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--prompt-lookup", "2", "--num-draft", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "drafted tokens accepted" in out.err
    assert main(base + ["--draft", gguf]) == 0  # the model drafting for itself: all accepted
    out = capsys.readouterr()
    assert out.out == plain and "(100%)" in out.err
    with pytest.raises(SystemExit):
        main(base + ["--draft", gguf, "--prompt-lookup", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(base + ["--prompt-lookup", "0"]) == 2
    assert "--prompt-lookup must be >= 1" in capsys.readouterr().err


def test_kvzoo_bench_speculative_reports_the_ratio(capsys, tmp_path):
    import json

    from helpers.assets import require_asset
    from zoo.cli import main

    gguf = str(require_asset("stories260K/stories260K.gguf"))
    assert main(["bench", "--speculative", gguf, "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_speculative.json").read_text())["speculative"]["rows"]
    assert {r["task"] for r in rows} == {"repeats its prompt", "does not repeat"}
    assert all(r["identical_to_plain"] and r["ratio"] > 0 for r in rows)
    repeating = next(r for r in rows if r["task"] == "repeats its prompt")
    assert repeating["tokens_per_forward"] > 1.2  # lookup really drafts on repeating text
    assert "speculative decoding vs plain" in capsys.readouterr().out
