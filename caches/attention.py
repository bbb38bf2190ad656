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
    mask = visibility(reference, q_positions, k_positions)  # bool [Lq, Lk] or [B, Lq, Lk]
    if mask.ndim == 3:
        mask = mask[:, None]  # [B, 1, Lq, Lk]: one mask for every head
    if bias is not None:
        additive = bias(q_positions, k_positions)
        if additive is not None:
            floor = mx.array(-float("inf"), dtype=queries.dtype)
            mask = mx.where(mask, additive.astype(queries.dtype), floor)
    return fast_sdpa(queries, keys, values, scale=scale, mask=mask)


def visibility(reference: Reference, q_positions: mx.array, k_positions: mx.array) -> mx.array:
    """Boolean visibility [Lq, Lk] (or [B, Lq, Lk] for rows with their own positions): the
    reference's mask, and for rows of a ragged batch the rule for left padding.

    In a ragged batch (positions [B, L], see Cache.prepare_rows) a negative position marks a
    padding slot. Padding is never attended: real queries see no key with a negative position.
    A padding query sees only itself (the key at its own position), so that its softmax has
    one finite term; its output is never read by a real query, so the rows' results are those
    of each row alone.
    """
    mask = reference.mask(q_positions, k_positions)
    if q_positions.ndim < 2 and k_positions.ndim < 2:
        return mask  # one sequence for every row: no padding
    q, k = q_positions[..., :, None], k_positions[..., None, :]  # [B, Lq, 1], [B, 1, Lk]
    return (mask & (k >= 0)) | ((q < 0) & (k == q))


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
