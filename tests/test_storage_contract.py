"""What a cache returns is what it says it returns (caches.conformance.check_storage).

Every registered cache, driven directly with random keys in several chunkings (with trims where
it can), returns the keys written at the positions it reports; and realistic bugs that the
logits checks might only catch by luck of the weights are caught here by behaviour: a cache
whose trim moves the offset but keeps the keys, a rotating ring that calls its keys "in order"
after the window dropped tokens between the sinks and the window, a cache that stores newest
first and says nothing. Last, the kit's other judgement of what a cache returned: a greedy
disagreement with the reference is forgiven only at a tie.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import caches
from caches.base import Fetched
from caches.concat import ConcatCache
from caches.conformance import DEFAULT_TOLERANCE, check, check_storage
from caches.rotating import RotatingCache
from helpers.assets import ROOT
from helpers.user_caches import LyingOrderCache, NewestFirstCache

CHUNKINGS = [(5, 1, 1, 7, 1, 3, 1, 1), (1,) * 14, (12, 9, 2), (3, 3, 3, 3, 3, 1)]
CASES = [(name, options) for name in caches.available()
         for options in caches.examples(name, head_dim=32, seq_len=30)]


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_every_registered_cache_returns_what_it_says(name, options, chunks):
    for trims in (None, {0: 1, 2: 2}, {}):
        problems = check_storage(lambda: caches.get(name)(**options), chunks=chunks, trims=trims,
                                 head_dim=32)
        assert problems == [], problems


class TrimKeepsKeys(ConcatCache):
    """Planted bug: trim moves the offset but leaves the trimmed keys stored."""

    def _trim(self, n):
        pass


class RingSaysInOrder(RotatingCache):
    """Planted bug: a chunk across the wrap is returned as if its keys were 0..n-1 in order."""

    def _append(self, keys, values):
        fetched = super()._append(keys, values)
        if isinstance(fetched, Fetched) and not fetched.causal:
            return fetched.keys, fetched.values
        return fetched


class RingPositionsOffByOne(RotatingCache):
    """Planted bug: key positions after the wrap one too high."""

    def _ring_positions(self, offset):
        return super()._ring_positions(offset) + 1


@pytest.mark.parametrize("make", [
    TrimKeepsKeys,
    lambda: RingSaysInOrder(max_size=6, keep=2),
    lambda: RingPositionsOffByOne(max_size=6, keep=2),
    LyingOrderCache,
], ids=["trim-keeps-keys", "ring-says-in-order", "ring-positions-off-by-one", "newest-first-unsaid"])
def test_a_cache_that_misreports_what_it_returns_is_caught(make):
    caught = [check_storage(make, chunks=chunks) for chunks in CHUNKINGS]
    assert any(caught), caught  # by every chunking where the bug shows (a long chunk across the wrap, a trim)


def test_an_honest_out_of_order_cache_passes():
    assert check_storage(NewestFirstCache) == []


def test_the_check_runs_inside_the_conformance_kit(registered):
    from zoo.cli.check import check_pairings

    registered("test-trim-keeps-keys", TrimKeepsKeys)
    rows = check_pairings(families=["llama"], schemes=["rope"], cache_names=["test-trim-keeps-keys"],
                          layouts=["GQA"])
    assert rows and all(not r.report.ok and r.report.storage for r in rows)


def test_size_counts_what_a_dropping_cache_holds():
    """`size()` (tokens attention can see) is the number of stored key positions, not the offset,
    for a cache that forgets tokens and does not override size (docs' last-n example)."""
    import zoo
    from kvzoo import plugins

    import sys

    from caches.registry import CACHES

    if "last-n" in CACHES:  # another test's registration of the same file
        CACHES.remove("last-n")
    module = plugins.load(str(ROOT / "docs" / "examples" / "last_n_cache.py"))
    sys.modules.pop(module.__name__, None)  # a later load registers it again (as test_extending does)
    try:
        model = zoo.build("llama", preset="tiny", seed=3)
        cache = caches.make("last-n", model, window=5)
        model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9]]), cache)
        assert cache[0].offset == 9
        assert cache[0].size() == len(cache[0].key_positions().tolist()) == 5
    finally:
        CACHES.remove("last-n")


def test_a_foreign_format_is_named(tmp_path):
    """A file that says it is another format version is refused with the version it says."""
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"x": mx.zeros((1,))},
                        metadata={"kvzoo.format": "kvzoo-cache-v999"})
    with pytest.raises(ValueError, match="format 'kvzoo-cache-v999'"):
        caches.load(tmp_path / "other.safetensors")

# -- the kit forgives a greedy disagreement only at a tie (caches.conformance.check) ---------
# A cached run and its reference may pick different greedy tokens where the reference's two best
# logits are within the tolerance: float summation order decides such a step, not the cache. The
# oracle is a stand-in model whose logits are written here by hand, so which steps are ties, and
# how many, is known without running kvzoo's code.


class HandWrittenLogits:
    """model(tokens, cache) -> logits [1, L, 3], row i predicting the token after position i:
    token 1 first by 1.0, except at the positions in `flipped`, where the uncached forward
    (reference or true) ranks token 2 first by `gap` and the cached run token 1 by `gap`.
    The cached run stores one zero key per token, so its cache counts the positions."""

    def __init__(self, gap: float, flipped: set[int]) -> None:
        self.gap, self.flipped = gap, flipped

    def __call__(self, tokens: mx.array, cache=None, reference=None) -> mx.array:
        B, L = tokens.shape
        start = 0
        if cache is not None:
            start = cache[0].offset
            cache[0].update_and_fetch(*[mx.zeros((B, 1, L, 4))] * 2)  # [B, Hkv, L, D]
        top, other = (1.0 + self.gap, 1.0) if cache is not None else (1.0, 1.0 + self.gap)
        rows = [[0.0, top, other] if start + i in self.flipped else [0.0, 2.0, 1.0] for i in range(L)]
        return mx.array([rows] * B)  # [B, L, V]


PROMPT = [0, 0, 0, 0]  # decode step s is judged by row len(PROMPT) - 1 + s


def run(gap: float, steps: set[int]):
    model = HandWrittenLogits(gap, {len(PROMPT) - 1 + s for s in steps})
    return check(model, lambda: [NewestFirstCache()], PROMPT, decode=5)


@pytest.mark.parametrize("steps", [{0}, {1, 3}, {0, 2, 4}, {0, 1, 2, 3, 4}])
def test_disagreements_within_the_tolerance_are_counted_as_ties(steps):
    report = run(DEFAULT_TOLERANCE / 2, steps)
    assert report.tokens == [1] * 5
    assert (report.greedy_agree, report.ties) == (5 - len(steps), len(steps))
    assert report.ok


@pytest.mark.parametrize("steps", [{0}, {1, 3}])
def test_a_disagreement_past_the_tolerance_is_no_tie_and_fails(steps):
    report = run(0.5, steps)
    assert (report.greedy_agree, report.ties) == (5 - len(steps), 0)
    assert not report.ok
