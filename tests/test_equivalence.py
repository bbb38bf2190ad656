"""The heart of the mission: every pairing preserves the uncached model's outputs.

For random model configs (family, positional scheme, MHA/GQA/MQA, layers, head size), random
tokens, random prefill chunking and decode lengths, and every registered cache (with the option
sets the cache itself declares at registration: `caches.examples`), the cached logits at every position
match the uncached forward under the cache's reference, and greedy decoding through the
canonical loop emits the tokens repeated uncached forwards emit. A newly registered cache is
covered with no edit here.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import event, given, settings

import caches
import positional
import zoo
from helpers.equivalence import run_scenario, scenarios

# KVZOO_PROPERTY_EXAMPLES: fewer examples for mutation runs (pyproject.toml [tool.mutmut]); CI uses 600
@settings(max_examples=int(os.environ.get("KVZOO_PROPERTY_EXAMPLES", 600)))
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
    for options in caches.examples(cache_name, head_dim=32, seq_len=30):
        s = dict(family=family, cache=cache_name, options=options, prompt_len=18, decode=12,
                 chunks=[7, 1, 1, 9, 1, 11], prefill_step=5, seed=len(GRID),
                 config=dict(positional=scheme, n_heads=4, n_kv_heads=n_kv_heads, head_dim=32,
                             n_layers=2, d_model=32, vocab_size=64, d_ff=64, max_positions=64,
                             init_std=0.1))
        run_scenario(s)
