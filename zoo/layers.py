"""The one seam where positions, positional hooks and the cache meet attention.

Every family projects its queries, keys and values its own way, then calls `attend`. Nothing
in a family touches positions, masks or caches directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from caches import Cache, Reference, scaled_dot_product_attention
from positional import Positional


@dataclass(frozen=True)
class Context:
    """What every layer needs to know about this forward pass, computed once at the top."""

    positions: mx.array  # [L] absolute positions of the input tokens
    positional: Positional
    reference: Reference  # what the uncached path must do (ignored when a cache is given)


def attend(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    ctx: Context,
    cache: Optional[Cache],
    scale: float,
) -> mx.array:
    """Attention output [B, Hq, L, D] for queries [B, Hq, L, D], keys/values [B, Hkv, L, D]."""
    queries, keys = ctx.positional.rotate(queries, keys, ctx.positions)
    bias = ctx.positional.bias if ctx.positional.uses_bias else None
    if cache is not None:
        return cache.attend(
            queries, keys, values, scale=scale, q_positions=ctx.positions, bias=bias
        )
    keys, values = ctx.reference.transform_kv(keys, values)
    return scaled_dot_product_attention(
        queries,
        keys,
        values,
        scale=scale,
        q_positions=ctx.positions,
        k_positions=None,  # uncached: keys are positions 0..L-1 in order
        reference=ctx.reference,
        bias=bias,
    )


def split_heads(x: mx.array, n_heads: int) -> mx.array:
    """[B, L, n_heads * D] -> [B, n_heads, L, D]."""
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """[B, H, L, D] -> [B, L, H * D]."""
    B, H, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * D)
