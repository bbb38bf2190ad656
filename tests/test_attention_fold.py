"""The CPU decode path folds grouped query heads into rows of one product per key/value head
(caches.attention.fast_sdpa). Oracle: mx.fast.scaled_dot_product_attention on the unfolded
heads, which MLX computes by broadcasting each key/value head over its query heads."""

from __future__ import annotations

import mlx.core as mx
import pytest

from caches.attention import fast_sdpa


def unfolded(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (6, 1), (4, 4), (12, 4)])
@pytest.mark.parametrize("mask_kind", ["none", "shared", "batched", "per_head_bias"])
def test_folded_heads_match_broadcast_heads(Hq, Hkv, mask_kind):
    B, S, D = 2, 37, 16
    keys = [mx.random.key(i) for i in range(5)]
    q = mx.random.normal((B, Hq, 1, D), key=keys[0])
    k = mx.random.normal((B, Hkv, S, D), key=keys[1])
    v = mx.random.normal((B, Hkv, S, D + 8), key=keys[2])  # value width may differ
    visible = mx.random.uniform(shape=(B, 1, 1, S), key=keys[3]) > 0.3
    visible[..., -1] = True  # every row sees at least one key
    if mask_kind == "none":
        mask = None
    elif mask_kind == "shared":
        mask = visible[0, 0]  # [1, S], one row for every batch and head
    elif mask_kind == "batched":
        mask = visible  # [B, 1, 1, S]
    else:
        bias = mx.random.normal((Hq, 1, S), key=keys[4])  # ALiBi-like: one row per query head
        mask = mx.where(visible[0, 0], bias, -float("inf"))  # [Hq, 1, S]
    got = fast_sdpa(q, k, v, scale=0.25, mask=mask)
    want = unfolded(q, k, v, 0.25, mask)
    assert got.shape == (B, Hq, 1, D + 8)
    assert mx.abs(got - want).max().item() <= 1e-6


def test_more_than_one_query_is_not_folded():
    q = mx.random.normal((1, 4, 3, 8), key=mx.random.key(0))
    k = mx.random.normal((1, 2, 5, 8), key=mx.random.key(1))
    got = fast_sdpa(q, k, k, scale=0.5)
    assert mx.array_equal(got, unfolded(q, k, k, 0.5, None))
