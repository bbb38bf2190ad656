"""A ragged batch builds its padding mask once per forward, not once per layer
(caches.Cache.rows_visibility), and every row still equals that row alone.

Oracle for the values: the uncached forward of each row alone (as tests/test_batching.py).
The count comes from `caches.base.visibility`, the one function that builds the mask.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import caches
import caches.base
import zoo


def _counting(monkeypatch) -> list[int]:
    calls = [0]
    real = caches.base.visibility

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(caches.base, "visibility", counted)
    return calls


ROWS = [[5, 9, 2, 7, 1, 3], [4, 8], [6, 1, 2, 9]]


def _run(model, name, options):
    width = max(len(r) for r in ROWS)
    padding = [width - len(r) for r in ROWS]
    tokens = mx.array([[0] * p + r for p, r in zip(padding, ROWS)], dtype=mx.int32)
    cache = caches.make(name, model, **options)
    for c in cache:
        c.prepare_rows(padding)
    prefill = model(tokens[:, :-1], cache)  # [B, width - 1, V]
    step = model(tokens[:, -1:], cache)  # one decode step, [B, 1, V]
    return mx.concatenate([prefill, step], axis=1), padding


@pytest.mark.parametrize("name, options", [("preallocated", {}), ("concat", {}),
                                           ("quantized", {"bits": 8, "group_size": 32})])
def test_one_mask_per_forward_for_in_order_caches(monkeypatch, name, options):
    model = zoo.build("llama", preset="tiny", seed=0, n_layers=3)
    calls = _counting(monkeypatch)
    logits, padding = _run(model, name, options)
    assert calls[0] == 2  # two forwards (prefill, decode step), three layers: one mask each
    if name == "quantized":
        return  # rounding: its rows against the oracle are tests/test_batching.py's (flips accounted)
    reference = caches.make(name, model, **options)[0].reference
    for b, row in enumerate(ROWS):
        alone = model(mx.array([row]), reference=reference)[0]  # [len(row), V]
        got = logits[b, padding[b]:]
        assert mx.abs(got - alone).max().item() <= 1e-4


def test_a_window_cache_builds_its_own_mask_in_each_layer(monkeypatch):
    # the rotating cache's keys are not in slot order and its reference is a window: no sharing
    model = zoo.build("llama", preset="tiny", seed=0, n_layers=3)
    calls = _counting(monkeypatch)
    logits, padding = _run(model, "rotating", {"max_size": 4, "keep": 1})
    assert calls[0] == 2 * 3
    reference = caches.make("rotating", model, max_size=4, keep=1)[0].reference
    for b, row in enumerate(ROWS):
        alone = model(mx.array([row]), reference=reference)[0]
        assert mx.abs(logits[b, padding[b]:] - alone).max().item() <= 1e-4


def test_the_shared_mask_goes_with_its_forwards_positions():
    model = zoo.build("llama", preset="tiny", seed=0, n_layers=2)
    width = max(len(r) for r in ROWS)
    cache = caches.make("preallocated", model)
    for c in cache:
        c.prepare_rows([width - len(r) for r in ROWS])
    c = cache[0]
    c.update_and_fetch(*(mx.zeros((len(ROWS), model.config.n_kv_heads, width, model.config.head_dim)),) * 2)
    q_positions = mx.array([[width - 1 - p] for p in c.row_padding], dtype=mx.int32)  # [B, 1]
    first = c.rows_visibility(q_positions)
    assert c.rows_visibility(q_positions)[1] is first[1]  # the same forward: the same mask
    assert c.rows_visibility(mx.array(q_positions))[1] is not first[1]  # another forward: its own
    assert caches.base._ROWS_MASK[0] is None  # ... whose positions are gone, and its mask with them
    c.rows_visibility(q_positions)
    assert caches.base._ROWS_MASK[0] is not None
    del q_positions
    assert caches.base._ROWS_MASK[0] is None
