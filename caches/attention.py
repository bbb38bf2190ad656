"""Scaled dot-product attention with the mask and bias a cache or reference asks for.

One function serves both the cached path (`Cache.attend`) and the uncached oracle, so the two
can only differ in the keys they attend to, never in how they attend.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

from .reference import Reference

# bias(q_positions, k_positions) -> additive bias broadcastable to [B, H, Lq, Lk], or None
Bias = Callable[[mx.array, mx.array], Optional[mx.array]]


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    q_positions: mx.array,
    k_positions: Optional[mx.array],
    reference: Reference,
    bias: Optional[Bias] = None,
) -> mx.array:
    """Attend `queries` [B, Hq, Lq, D] to `keys`/`values` [B, Hkv, Lk, D].

    `k_positions=None` promises the keys hold positions 0..Lk-1 in order and the queries are the
    last Lq of them; with a causal reference and no bias that is MLX's lower-right aligned
    "causal" mask (or no mask for one query), so nothing is materialised. Otherwise the boolean
    visibility comes from `reference.mask(q_positions, k_positions)` and the bias is added where
    visible.
    """
    if k_positions is None:
        if reference.causal and bias is None:
            if queries.shape[-2] > 1:
                return mx.fast.scaled_dot_product_attention(
                    queries, keys, values, scale=scale, mask="causal"
                )
            return fast_sdpa(queries, keys, values, scale=scale)  # one query sees every key
        k_positions = mx.arange(keys.shape[-2], dtype=mx.int32)
    mask = reference.mask(q_positions, k_positions)  # bool [Lq, Lk] or [B, Lq, Lk]
    if mask.ndim == 3:
        mask = mask[:, None]  # [B, 1, Lq, Lk]: one mask for every head
    if bias is not None:
        additive = bias(q_positions, k_positions)
        if additive is not None:
            floor = mx.array(-float("inf"), dtype=queries.dtype)
            mask = mx.where(mask, additive.astype(queries.dtype), floor)
    return fast_sdpa(queries, keys, values, scale=scale, mask=mask)


def fast_sdpa(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: Optional[mx.array] = None,
) -> mx.array:
    """mx.fast.scaled_dot_product_attention (same arguments, same result), with grouped query
    heads folded into rows for a single query on the CPU.

    MLX's CPU backend has no fused attention kernel. Its fallback serves grouped-query attention
    by broadcasting each key/value head against its n_rep query heads: n_rep * Hkv matrix
    products of one row each. With one query per head, the n_rep heads that share a key/value
    head are simply n_rep rows of one product ([B, Hkv, n_rep, D] @ keys^T), which is the same
    arithmetic in Hkv larger products: 1.5-2x faster attention at long context (measured in
    docs/performance.md). GPUs have fused kernels that handle groups themselves: left alone.
    """
    B, Hq, Lq, _ = queries.shape
    Hkv = keys.shape[1]
    if Lq != 1 or Hq == Hkv or mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    n_rep = Hq // Hkv
    queries = queries.reshape(B, Hkv, n_rep, queries.shape[-1])  # [B, Hkv, n_rep, D]: rows
    if mask is not None and mask.ndim >= 3 and mask.shape[-3] == Hq:  # per-head bias [..., Hq, 1, Lk]
        mask = mask.reshape(*mask.shape[:-3], Hkv, n_rep, mask.shape[-1])  # [..., Hkv, n_rep, Lk]
    # A mask [..., 1, Lk] shared by the heads broadcasts over the n_rep rows unchanged.
    out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    return out.reshape(B, Hq, 1, out.shape[-1])  # [B, Hkv, n_rep, Dv] -> [B, Hq, 1, Dv]


# -- attention written out: for caches that need the weights or assign positions themselves ----


def grouped_scores(queries: mx.array, keys: mx.array, scale: float) -> mx.array:
    """queries [B, Hq, Lq, D] . keys [B, Hkv, Lk, D] -> scores [B, Hq, Lq, Lk] (query head h reads
    kv head h // (Hq / Hkv))."""
    B, Hq, Lq, D = queries.shape
    Hkv = keys.shape[1]
    q = (queries * scale).reshape(B, Hkv, Hq // Hkv, Lq, D)  # [B, Hkv, n_rep, Lq, D]
    scores = q @ keys[:, :, None].swapaxes(-1, -2)  # [B, Hkv, n_rep, Lq, Lk]
    return scores.reshape(B, Hq, Lq, keys.shape[2])


def grouped_values(weights: mx.array, values: mx.array) -> mx.array:
    """weights [B, Hq, Lq, Lk] . values [B, Hkv, Lk, Dv] -> [B, Hq, Lq, Dv]."""
    B, Hq, Lq, Lk = weights.shape
    Hkv = values.shape[1]
    out = weights.reshape(B, Hkv, Hq // Hkv, Lq, Lk) @ values[:, :, None]  # [B, Hkv, n_rep, Lq, Dv]
    return out.reshape(B, Hq, Lq, values.shape[-1])


def _head_mask(mask: mx.array) -> mx.array:
    return mask[:, None] if mask.ndim == 3 else mask  # [B, Lq, Lk] -> [B, 1, Lq, Lk]


def masked_softmax(scores: mx.array, mask: mx.array, additive: Optional[mx.array] = None) -> mx.array:
    """softmax over the last axis of scores [B, Hq, Lq, Lk] + additive bias, where `mask` (bool,
    broadcastable; [B, Lq, Lk] means one mask per row) is True; zero weight elsewhere."""
    if additive is not None:  # [Hq, Lq, Lk], [Lq, Lk] or [B, 1 | Hq, Lq, Lk]: broadcasts as is
        scores = scores + additive.astype(scores.dtype)
    scores = mx.where(_head_mask(mask), scores, mx.array(-float("inf"), scores.dtype))
    return mx.softmax(scores, axis=-1, precise=True)


Rotate = Callable[[mx.array, mx.array], mx.array]  # (x [..., L, D], contiguous positions [L]) -> x rotated


def rotate_at(rotate: Optional[Rotate], x: mx.array, positions: list[int]) -> mx.array:
    """x [B, H, L, D] rotated at arbitrary `positions` (length L): one call per run of
    consecutive positions."""
    if rotate is None:
        return x
    pieces, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            run = mx.arange(positions[start], positions[start] + i - start, dtype=mx.int32)
            pieces.append(rotate(x[..., start:i, :], run))
            start = i
    return mx.concatenate(pieces, axis=-2) if len(pieces) > 1 else pieces[0]


def repositioned_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    q_positions: mx.array,
    reference: Reference,
    rotate: Optional[Rotate],
    bias: Optional[Bias] = None,
) -> mx.array:
    """The uncached oracle for a reference that assigns positions (`positions_as_seen`), over
    queries and keys not yet rotated: each query, one at a time, at the position the reference
    gives it, attends to the keys it sees at the positions they have for it. Slow and plain on
    purpose: the cache it checks computes the same thing another way."""
    Lq, Lk = queries.shape[2], keys.shape[2]
    k_positions = mx.arange(Lk, dtype=mx.int32)
    visible = reference.mask(q_positions, k_positions)  # [Lq, Lk]
    q_seen, k_seen = reference.positions_as_seen(q_positions, k_positions)  # [Lq], [Lq, Lk]
    visible, q_seen, k_seen = visible.tolist(), q_seen.tolist(), k_seen.tolist()
    outs = []
    for i in range(Lq):
        index = [j for j in range(Lk) if visible[i][j]]
        seen = [k_seen[i][j] for j in index]
        take = mx.array(index, dtype=mx.int32)
        k = rotate_at(rotate, keys[:, :, take], seen)
        q = rotate_at(rotate, queries[:, :, i : i + 1], [q_seen[i]])
        additive = None
        if bias is not None:
            additive = bias(mx.array([q_seen[i]], dtype=mx.int32), mx.array(seen, dtype=mx.int32))
        outs.append(mx.fast.scaled_dot_product_attention(
            q, k, values[:, :, take], scale=scale,
            mask=None if additive is None else additive.astype(q.dtype)))
    return mx.concatenate(outs, axis=2)


def mixed_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    q_positions: mx.array,
    reference: Reference,
    bias: Optional[Bias] = None,
) -> mx.array:
    """The uncached oracle for a reference where each query reads some keys and values rounded
    (`transform_kv`) and the others exact (`rounded_for`): the score of each (query, key) from
    the key it reads, the output from the value it reads."""
    k_positions = mx.arange(keys.shape[2], dtype=mx.int32)
    rounded_k, rounded_v = reference.transform_kv(keys, values)
    which = reference.rounded_for(q_positions, k_positions)
    if which is None:
        which = (mx.array(True), mx.array(True))
    key_r, value_r = which  # [Lq, Lk] bool
    scores = mx.where(key_r, grouped_scores(queries, rounded_k, scale), grouped_scores(queries, keys, scale))
    mask = reference.mask(q_positions, k_positions)
    additive = bias(q_positions, k_positions) if bias is not None else None
    weights = masked_softmax(scores, mask, additive)
    return (grouped_values(mx.where(value_r, weights, 0), rounded_v)
            + grouped_values(mx.where(value_r, 0, weights), values))
