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
            mask = "causal" if queries.shape[-2] > 1 else None
            return mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=scale, mask=mask
            )
        k_positions = mx.arange(keys.shape[-2], dtype=mx.int32)
    mask = reference.mask(q_positions, k_positions)  # bool [Lq, Lk] or [B, Lq, Lk]
    if mask.ndim == 3:
        mask = mask[:, None]  # [B, 1, Lq, Lk]: one mask for every head
    if bias is not None:
        additive = bias(q_positions, k_positions)
        if additive is not None:
            floor = mx.array(-float("inf"), dtype=queries.dtype)
            mask = mx.where(mask, additive.astype(queries.dtype), floor)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
