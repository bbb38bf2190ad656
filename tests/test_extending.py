"""A user's own cache: registering it is enough for the property test, the conformance kit and
`kvzoo check` to cover it; a cache that breaks its contract is caught by each of them."""

from __future__ import annotations

import mlx.core as mx
import pytest

import caches
from caches import conformance, registry
from helpers.equivalence import run_scenario
from zoo.cli.check import check_pairings


class NewestFirstCache(caches.Cache):
    """Stores keys newest first: exact, but never in order, so masks come from key_positions."""

    def __init__(self):
        super().__init__()
        self.keys = self.values = None

    def update_and_fetch(self, keys, values):
        self.check_update(keys, values)
        keys, values = keys[:, :, ::-1], values[:, :, ::-1]  # [B, H, L, D], newest first
        if self.keys is not None:
            keys = mx.concatenate([keys, self.keys], axis=2)
            values = mx.concatenate([values, self.values], axis=2)
        self.keys, self.values = keys, values
        self._commit_layout(keys, values)
        self.offset = keys.shape[2]
        return self.keys, self.values

    def key_positions(self):
        return mx.arange(self.offset - 1, -1, -1, dtype=mx.int32)

    @property
    def keys_in_order(self):
        return False

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)


class LyingOrderCache(NewestFirstCache):
    """The nanoGPT-style bug: slots out of time order, but claims they are in order."""

    @property
    def keys_in_order(self):
        return True


class ForgetfulCache(NewestFirstCache):
    """Silently drops the oldest token once it holds 6, while declaring the exact reference."""

    def update_and_fetch(self, keys, values):
        k, v = super().update_and_fetch(keys, values)
        return k[:, :, :6], v[:, :, :6]

    def key_positions(self):
        return super().key_positions()[:6]


@pytest.fixture
def registered():
    names = []

    def add(name, cls):
        caches.register(name)(cls)
        names.append(name)

    yield add
    for name in names:
        registry._CACHES.pop(name)


def scenario(cache_name, scheme, family="llama", n_kv_heads=2):
    return dict(family=family, cache=cache_name, options={}, prompt_len=10, decode=6,
                chunks=[4, 1, 7, 1, 1, 1, 1], prefill_step=3, seed=5,
                config=dict(positional=scheme, n_heads=4, n_kv_heads=n_kv_heads, head_dim=16,
                            n_layers=2, d_model=32, vocab_size=50, d_ff=32, max_positions=64,
                            init_std=0.1))


@pytest.mark.parametrize("scheme", ["learned", "rope", "alibi"])
def test_a_correct_custom_cache_passes_the_property_checks(registered, scheme):
    registered("test-newest-first", NewestFirstCache)
    assert "test-newest-first" in caches.available()
    run_scenario(scenario("test-newest-first", scheme))


def test_kvzoo_check_covers_a_registered_cache(registered):
    registered("test-newest-first", NewestFirstCache)
    rows = check_pairings(cache_names=["test-newest-first"])
    assert len(rows) == 2 * 3 * 3  # families x schemes x layouts
    assert all(r.report.ok for r in rows)


@pytest.mark.parametrize("cls", [LyingOrderCache, ForgetfulCache])
def test_a_cache_that_breaks_its_contract_is_caught(registered, cls):
    registered("test-broken", cls)
    with pytest.raises(AssertionError, match="differ from the reference"):
        run_scenario(scenario("test-broken", "rope"))
    rows = check_pairings(families=["llama"], schemes=["rope"], cache_names=["test-broken"])
    assert not any(r.report.ok for r in rows)


def test_conformance_kit_in_one_call():
    import zoo

    model = zoo.build("gpt2", preset="tiny", seed=1)
    good = conformance.check(model, lambda: caches.make("concat", model), list(range(12)),
                             chunks=[3, 9], decode=5)
    bad = conformance.check(model, lambda: [ForgetfulCache() for _ in model.layers],
                            list(range(12)), chunks=[3, 9], decode=5)
    assert good.ok and good.greedy_agree == 5 and good.max_abs_diff <= 1e-4
    assert not bad.ok and bad.max_abs_diff > 1e-2
