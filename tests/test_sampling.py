"""Samplers and logits processors: what they may sample, how often, and against mlx-lm and HF."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sampling
from helpers.assets import require_module

V = 12
DRAWS = 20000


def random_logprobs(seed: int, vocab: int = V, scale: float = 2.0) -> mx.array:
    logits = np.random.default_rng(seed).normal(scale=scale, size=(1, vocab)).astype(np.float32)
    logits -= np.log(np.exp(logits.astype(np.float64)).sum())
    return mx.array(logits)


def draw(sampler, logprobs: mx.array, n: int = DRAWS) -> np.ndarray:
    """n samples at once: the sampler sees n identical rows [n, V]."""
    return np.array(sampler(mx.broadcast_to(logprobs, (n, logprobs.shape[-1]))))


def frequencies(samples: np.ndarray, vocab: int = V) -> np.ndarray:
    return np.bincount(samples, minlength=vocab) / samples.size


def expected(probs: np.ndarray, keep: np.ndarray, temp: float = 1.0) -> np.ndarray:
    """The distribution after keeping `keep` and applying the temperature (numpy reference)."""
    weights = np.where(keep, probs.astype(np.float64) ** (1.0 / temp), 0.0)
    return weights / weights.sum()


def probs_of(logprobs: mx.array) -> np.ndarray:
    return np.exp(np.array(logprobs[0], dtype=np.float64))


# -- which tokens may be sampled, and how often ----------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_samples_only_the_k_best_in_proportion(k):
    logprobs = random_logprobs(k)
    probs = probs_of(logprobs)
    best = set(np.argsort(-probs)[:k])
    samples = draw(sampling.make_sampler(temp=1.0, top_k=k, seed=1), logprobs)
    assert set(samples) <= best
    keep = np.isin(np.arange(V), list(best))
    assert np.abs(frequencies(samples) - expected(probs, keep)).max() < 0.015


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_samples_the_smallest_set_holding_mass_p(p):
    logprobs = random_logprobs(10 + int(p * 10))
    probs = probs_of(logprobs)
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]  # mass of strictly more likely tokens
    nucleus = order[mass_before < p]  # add tokens until the mass reaches p
    keep = np.isin(np.arange(V), nucleus)
    assert probs[keep].sum() >= p and probs[keep].sum() - probs[keep].min() < p
    samples = draw(sampling.make_sampler(temp=1.0, top_p=p, seed=2), logprobs)
    assert set(samples) == set(nucleus)
    assert np.abs(frequencies(samples) - expected(probs, keep)).max() < 0.015


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.5])
def test_min_p_keeps_tokens_at_least_min_p_times_the_best(min_p):
    logprobs = random_logprobs(20 + int(min_p * 100))
    probs = probs_of(logprobs)
    keep = probs >= min_p * probs.max()
    samples = draw(sampling.make_sampler(temp=1.0, min_p=min_p, seed=3), logprobs)
    assert set(samples) == set(np.flatnonzero(keep))
    assert np.abs(frequencies(samples) - expected(probs, keep)).max() < 0.015


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_logits_over_temp(temp):
    logprobs = random_logprobs(30, scale=1.0)
    probs = probs_of(logprobs)
    samples = draw(sampling.make("temperature", temp=temp, seed=4), logprobs)
    assert np.abs(frequencies(samples) - expected(probs, np.ones(V, bool), temp)).max() < 0.015


def test_temperature_applies_after_the_filters():
    # top-k chooses by the model's probabilities; the temperature only reshapes the survivors.
    logprobs = random_logprobs(31)
    probs = probs_of(logprobs)
    keep = np.isin(np.arange(V), np.argsort(-probs)[:4])
    samples = draw(sampling.make_sampler(temp=2.0, top_k=4, seed=5), logprobs)
    assert np.abs(frequencies(samples) - expected(probs, keep, temp=2.0)).max() < 0.015


@pytest.mark.parametrize("options", [dict(), dict(top_k=3, top_p=0.5, min_p=0.1)])
def test_zero_temperature_and_greedy_are_the_argmax(options):
    logprobs = mx.concatenate([random_logprobs(s) for s in range(8)])  # [8, V]
    best = np.argmax(np.array(logprobs), axis=-1)
    assert (np.array(sampling.make_sampler(temp=0, **options)(logprobs)) == best).all()
    assert (np.array(sampling.make("greedy")(logprobs)) == best).all()


def test_top_k_at_least_the_vocabulary_keeps_every_token():
    logprobs = random_logprobs(40, scale=0.5)
    assert set(draw(sampling.make_sampler(temp=1.0, top_k=V + 5, seed=6), logprobs)) == set(range(V))


# -- reproducibility -------------------------------------------------------------------------------

def sequence(sampler, n=30):
    return [sampler(random_logprobs(i, vocab=50)).item() for i in range(n)]


def test_seeded_samplers_are_reproducible_and_independent_of_the_global_state():
    options = dict(temp=2.0, top_p=0.9, top_k=20, min_p=0.05)
    mx.random.seed(0)
    first = sequence(sampling.make_sampler(seed=7, **options))
    mx.random.seed(123)
    assert sequence(sampling.make_sampler(seed=7, **options)) == first
    assert sequence(sampling.make_sampler(seed=8, **options)) != first


def test_unseeded_samplers_follow_the_global_seed():
    mx.random.seed(5)
    first = sequence(sampling.make_sampler(temp=1.0))
    mx.random.seed(5)
    assert sequence(sampling.make_sampler(temp=1.0)) == first


# -- against mlx-lm's sample utilities ------------------------------------------------------------

@pytest.mark.parametrize(
    "options",
    [dict(temp=0.0), dict(temp=0.5), dict(temp=1.0, top_p=0.9), dict(temp=2.0, top_k=5),
     dict(temp=1.0, min_p=0.05), dict(temp=0.5, top_p=0.6, top_k=10, min_p=0.2)],
)
def test_same_tokens_as_mlx_lm_from_the_same_random_state(options):
    from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler

    mx.random.seed(11)
    ours = sequence(sampling.make_sampler(**options), n=60)
    mx.random.seed(11)
    theirs = sequence(mlx_lm_make_sampler(**options), n=60)
    assert ours == theirs


# -- filters against HF transformers' logits warpers ---------------------------------------------

def hf_mask(warper, logprobs: mx.array) -> np.ndarray:
    torch = require_module("torch")
    scores = torch.tensor(np.array(logprobs))
    return np.isfinite(warper(None, scores).numpy())


def our_mask(keep, logprobs: mx.array) -> np.ndarray:
    return np.isfinite(np.array(keep(logprobs)))


# A few thresholds only: on the CPU, MLX compiles a kernel for each new constant (~0.6 s).
@settings(max_examples=60)
@given(st.integers(0, 10_000), st.integers(1, 40), st.sampled_from([0.3, 0.6, 0.9]),
       st.sampled_from([0.05, 0.2, 0.5]))
def test_filters_keep_the_same_tokens_as_transformers(seed, k, p, min_p):
    require_module("transformers")
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logprobs = random_logprobs(seed, vocab=64)
    probs = np.sort(probs_of(logprobs))
    # Skip thresholds that fall (within float error) exactly on a cumulative mass or ratio.
    if np.abs(np.cumsum(probs[::-1]) - p).min() < 1e-5 or np.abs(probs / probs.max() - min_p).min() < 1e-5:
        return
    assert (our_mask(sampling.top_k_filter(k), logprobs) == hf_mask(TopKLogitsWarper(k), logprobs)).all()
    assert (our_mask(sampling.top_p_filter(p), logprobs) == hf_mask(TopPLogitsWarper(p), logprobs)).all()
    assert (our_mask(sampling.min_p_filter(min_p), logprobs) == hf_mask(MinPLogitsWarper(min_p), logprobs)).all()


# -- logits processors ------------------------------------------------------------------------------

def ctrl_penalty(logits: np.ndarray, tokens: list[int], penalty: float) -> np.ndarray:
    """CTRL (Keskar et al. 2019) as HF implements it, in numpy."""
    out = logits.copy()
    for t in set(tokens):
        out[0, t] = out[0, t] / penalty if out[0, t] > 0 else out[0, t] * penalty
    return out


@pytest.mark.parametrize("penalty", [0.5, 1.3, 3.0])
def test_repetition_penalty_is_ctrl_and_leaves_the_input_alone(penalty):
    logits = mx.array(np.random.default_rng(0).normal(size=(1, 30)).astype(np.float32))
    before = np.array(logits)
    tokens = [3, 7, 7, 12, 29, 0, 3]
    out = sampling.make_processor("repetition_penalty", penalty=penalty, context_size=None)(mx.array(tokens), logits)
    np.testing.assert_allclose(np.array(out), ctrl_penalty(before, tokens, penalty), rtol=1e-6)
    np.testing.assert_array_equal(np.array(logits), before)
    if penalty > 1:  # a repeated token always becomes less likely
        assert (np.array(out)[0, tokens] < before[0, tokens]).all()


def test_repetition_penalty_matches_transformers_and_mlx_lm():
    torch = require_module("torch")
    require_module("transformers")
    from mlx_lm.sample_utils import make_repetition_penalty
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 100)).astype(np.float32)
    tokens = rng.integers(0, 100, size=40).tolist()
    hf = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([tokens]), torch.tensor(logits)).numpy()
    whole = sampling.make_processor("repetition_penalty", penalty=1.5, context_size=None)
    np.testing.assert_allclose(np.array(whole(mx.array(tokens), mx.array(logits))), hf, rtol=1e-6)
    theirs = make_repetition_penalty(1.5, context_size=20)(mx.array(tokens), mx.array(logits))
    window = sampling.make_processor("repetition_penalty", penalty=1.5, context_size=20)
    np.testing.assert_allclose(np.array(window(mx.array(tokens), mx.array(logits))), np.array(theirs), rtol=1e-6)


def test_logit_bias_adds_to_the_listed_tokens_and_can_ban():
    logits = mx.zeros((1, 8))
    out = sampling.make_processor("logit_bias", bias={1: 2.5, 6: -math.inf})(mx.array([0]), logits)
    assert np.array(out).tolist() == [[0, 2.5, 0, 0, 0, 0, -math.inf, 0]]
    banned = draw(sampling.make_sampler(temp=1.0, seed=0), out[:, :] - mx.logsumexp(out), n=2000)
    assert 6 not in set(banned)
    with pytest.raises(ValueError, match="outside the vocabulary of 8"):
        sampling.make_processor("logit_bias", bias={8: 1.0})(mx.array([0]), logits)


def test_make_logits_processors_composes_in_order():
    logits = mx.array([[2.0, -2.0, 1.0, 0.5]])
    processors = sampling.make_logits_processors(repetition_penalty=2.0, logit_bias={2: 1.0})
    out = logits
    for process in processors:
        out = process(mx.array([0, 1, 2]), out)
    assert np.array(out).tolist() == [[1.0, -4.0, 1.0, 0.5]]  # bias first, then (2 + 1) / 2
    assert sampling.make_logits_processors() == []
    assert sampling.make_logits_processors(repetition_penalty=1.0) == []


# -- bad options ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temp=-0.1), "temperature"), (dict(temp=float("nan")), "temperature"), (dict(temp=True), "temperature"),
        (dict(temp=1, top_p=0), r"top_p.*\(0, 1\]"), (dict(temp=1, top_p=1.5), "top_p"),
        (dict(temp=1, top_p=-0.2), "top_p"), (dict(temp=1, top_k=-1), "top_k"), (dict(temp=1, top_k=2.5), "top_k"),
        (dict(temp=1, min_p=-0.1), "min_p"), (dict(temp=1, min_p=1.5), "min_p"),
        (dict(temp=1, min_tokens_to_keep=0), "min_tokens_to_keep"),
        (dict(temp=1, seed=-1), "seed"), (dict(temp=1, seed="7"), "seed"),
        (dict(temp=0, top_p=2.0), "top_p"),  # checked even when greedy makes it moot
    ],
)
def test_bad_sampler_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        sampling.make_sampler(**options)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(repetition_penalty=0), "penalty"), (dict(repetition_penalty=-1.0), "penalty"),
        (dict(repetition_penalty=1.2, repetition_context_size=0), "context_size"),
        (dict(logit_bias={-1: 1.0}), "keys"), (dict(logit_bias={"a": 1.0}), "keys"),
        (dict(logit_bias={1: float("nan")}), r"logit_bias\[1\]"), (dict(logit_bias=[1, 2]), "dict"),
    ],
)
def test_bad_processor_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        sampling.make_logits_processors(**options)


def test_registries_list_and_check_names():
    assert {"greedy", "temperature", "top_k", "top_p", "min_p"} <= set(sampling.available())
    assert {"repetition_penalty", "logit_bias"} <= set(sampling.available_processors())
    with pytest.raises(ValueError, match="repetition_penalty"):
        sampling.make_processor("presence")
    with pytest.raises(TypeError, match="accepts: penalty, context_size"):
        sampling.make_processor("repetition_penalty", strength=2)
    sample = sampling.make("top_p", top_p=0.5, temp=0.7, seed=0)
    assert sample(random_logprobs(0)).shape == (1,)
