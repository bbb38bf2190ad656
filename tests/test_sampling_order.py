"""The order of the truncation filters is part of what a sampler means: top-p, then min-p, then
top-k, on the model's distribution, then the temperature (mlx-lm's order). min-p and top-k
commute (each keeps a prefix of the sorted tokens by a rule that renormalising does not change),
so what matters is that top-p sees the whole distribution: the cases are chosen so that every
order with top-p later keeps a different set of tokens, and a reordering cannot pass.

Oracles: mlx-lm's make_sampler drawing from the same global random state (identical tokens),
and transformers' own warpers applied one by one in the same order (identical kept sets).
"""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest

import sampling
from helpers.assets import require_module

# (probabilities, top_p, min_p, top_k): top-p first keeps another set than top-p after either.
CASES = [
    ([0.283, 0.206, 0.14, 0.125, 0.091, 0.078, 0.06, 0.016], 0.63, 0.4, 6),
    ([0.422, 0.188, 0.109, 0.09, 0.083, 0.054, 0.033, 0.021], 0.73, 0.07, 4),
    ([0.321, 0.211, 0.132, 0.122, 0.085, 0.076, 0.05, 0.003], 0.67, 0.37, 5),
]


def logprobs_of(probs) -> mx.array:
    p = np.array(probs, dtype=np.float64)
    return mx.array(np.log(p / p.sum()).astype(np.float32))[None]  # [1, V]


def kept(logprobs: mx.array) -> frozenset:
    return frozenset(np.nonzero(np.isfinite(np.array(logprobs[0])))[0].tolist())


def filters(top_p, min_p, top_k):
    return {"top_p": sampling.top_p_filter(top_p), "min_p": sampling.min_p_filter(min_p),
            "top_k": sampling.top_k_filter(top_k)}


@pytest.mark.parametrize("probs,top_p,min_p,top_k", CASES)
def test_each_case_tells_the_orders_apart(probs, top_p, min_p, top_k):
    chain = filters(top_p, min_p, top_k)
    results = {}
    for order in itertools.permutations(chain):
        x = logprobs_of(probs)
        for name in order:
            x = chain[name](x)
        results[order] = kept(x)
    documented = results[("top_p", "min_p", "top_k")]
    for order, result in results.items():  # the tests below can tell the orders apart
        assert (result == documented) == (order[0] == "top_p"), order


@pytest.mark.parametrize("probs,top_p,min_p,top_k", CASES)
def test_same_tokens_as_mlx_lm_with_all_three_filters(probs, top_p, min_p, top_k):
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    ours = sampling.make_sampler(temp=0.9, top_p=top_p, min_p=min_p, top_k=top_k)
    theirs = mlx_lm_sampler(temp=0.9, top_p=top_p, min_p=min_p, top_k=top_k)
    x = mx.repeat(logprobs_of(probs), 400, axis=0)  # 400 draws in one call
    mx.random.seed(17)
    a = np.array(ours(x))
    mx.random.seed(17)
    b = np.array(theirs(x))
    assert np.array_equal(a, b)
    assert len(set(a.tolist())) >= 2  # really sampling, not collapsed to one token


@pytest.mark.parametrize("probs,top_p,min_p,top_k", CASES)
def test_kept_tokens_equal_transformers_warpers_in_the_same_order(probs, top_p, min_p, top_k):
    torch = require_module("torch")
    transformers = require_module("transformers")
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ours = logprobs_of(probs)
    for keep in filters(top_p, min_p, top_k).values():  # the dict's order is the sampler's order
        ours = keep(ours)
    scores = torch.tensor(np.array(logprobs_of(probs)))
    for warp in (TopPLogitsWarper(top_p), MinPLogitsWarper(min_p), TopKLogitsWarper(top_k)):
        scores = warp(None, scores)
    theirs = frozenset(torch.nonzero(torch.isfinite(scores[0])).flatten().tolist())
    assert kept(ours) == theirs
    assert transformers.__version__ and not math.isnan(float(scores.max()))


def test_the_sampler_applies_its_filters_in_the_documented_order():
    """make_sampler's own chain, observed through what it can draw."""
    probs, top_p, min_p, top_k = CASES[0]
    expected = logprobs_of(probs)
    for keep in filters(top_p, min_p, top_k).values():
        expected = keep(expected)
    sampler = sampling.make_sampler(temp=1.0, top_p=top_p, min_p=min_p, top_k=top_k, seed=3)
    drawn = set(np.array(sampler(mx.repeat(logprobs_of(probs), 2000, axis=0))).tolist())
    assert drawn == set(kept(expected))
