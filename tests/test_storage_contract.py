"""What a cache returns is what it says it returns (caches.conformance.check_storage).

Every registered cache, driven directly with random keys in several chunkings (with trims where
it can), returns the keys written at the positions it reports; and realistic bugs that the
logits checks might only catch by luck of the weights are caught here by behaviour: a cache
whose trim moves the offset but keeps the keys, a rotating ring that calls its keys "in order"
after the window dropped tokens between the sinks and the window, a cache that stores newest
first and says nothing.
"""

from __future__ import annotations

import pytest

import caches
from caches.base import Fetched
from caches.concat import ConcatCache
from caches.conformance import check_storage
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
    import mlx.core as mx

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
    import mlx.core as mx

    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"x": mx.zeros((1,))},
                        metadata={"kvzoo.format": "kvzoo-cache-v999"})
    with pytest.raises(ValueError, match="format 'kvzoo-cache-v999'"):
        caches.load(tmp_path / "other.safetensors")
