"""The one seam where positions, positional hooks and the cache meet attention.

Every family projects its queries, keys and values its own way, then calls `attend`. Nothing
in a family touches positions, masks or caches directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from caches import Cache, Reference, scaled_dot_product_attention
from caches.attention import mixed_attention, repositioned_attention, visibility
from positional import Positional

from . import fastmath

# The cache API's bias hook: (q_positions, k_positions) -> additive bias or None.
Bias = Callable[[mx.array, mx.array], Optional[mx.array]]


@dataclass(frozen=True)
class Context:
    """What every layer needs to know about this forward pass, computed once at the top."""

    positions: mx.array  # [L] absolute positions of the input tokens ([B, L]: rows of a ragged batch)
    positional: Positional
    reference: Reference  # what the uncached path must do (ignored when a cache is given)
    window: Optional[int] = None  # the model's sliding window (ModelConfig.sliding_window)
    training: bool = False  # the model is in training mode: uncached attention uses training_attention
    _layers_seen: list = field(default_factory=lambda: [0], compare=False, repr=False)

    def layer_reference(self) -> Reference:
        """The reference of the next attention layer of this forward (layers attend in order)."""
        index = self._layers_seen[0]
        self._layers_seen[0] += 1
        return self.reference.layer(index)

    def rotate(self) -> Optional[Callable[[mx.array, mx.array], mx.array]]:
        """(x [..., L, D], contiguous positions [L]) -> x rotated by the positional scheme, for a
        cache or reference that places keys itself; None when the scheme does not rotate."""
        if type(self.positional).rotate is Positional.rotate:
            return None
        return lambda x, positions: self.positional.rotate(x, x, positions)[0]


def attend(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    ctx: Context,
    cache: Optional[Cache],
    scale: float,
) -> mx.array:
    """Attention output [B, Hq, L, D] for queries [B, Hq, L, D], keys/values [B, Hkv, L, D].

    A cache that places keys itself (`rotates_keys`, StreamingLLM) gets them before RoPE, with
    the scheme's rotation; so does the oracle of a reference that assigns positions."""
    bias = ctx.positional.bias if ctx.positional.uses_bias else None
    if ctx.window is not None:
        bias = window_bias(ctx.window, bias)
    if cache is not None and getattr(cache, "rotates_keys", False):
        return cache.attend(queries, keys, values, scale=scale, q_positions=ctx.positions,
                            bias=bias, rotate=ctx.rotate())
    reference = ctx.layer_reference() if cache is None else None
    if reference is not None and reference.repositions:
        keys, values = reference.transform_kv(keys, values)
        return repositioned_attention(queries, keys, values, scale=scale, q_positions=ctx.positions,
                                      reference=reference, rotate=ctx.rotate(), bias=bias)
    queries, keys = ctx.positional.rotate(queries, keys, ctx.positions)
    if cache is not None:
        return cache.attend(
            queries, keys, values, scale=scale, q_positions=ctx.positions, bias=bias
        )
    if ctx.training and not reference.mixes:
        keys, values = reference.transform_kv(keys, values)
        return training_attention(queries, keys, values, scale=scale, positions=ctx.positions,
                                  reference=reference, bias=bias)
    if reference.mixes:
        return mixed_attention(queries, keys, values, scale=scale, q_positions=ctx.positions,
                               reference=reference, bias=bias)
    keys, values = reference.transform_kv(keys, values)
    return scaled_dot_product_attention(
        queries,
        keys,
        values,
        scale=scale,
        q_positions=ctx.positions,
        k_positions=None,  # uncached: keys are positions 0..L-1 in order
        reference=reference,
        bias=bias,
    )


def training_attention(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
                       positions: mx.array, reference: Reference, bias: Optional[Bias]) -> mx.array:
    """Uncached attention [B, Hq, L, D] written out for the compiled training step: scores
    q k^T * scale plus the reference's mask (-inf where hidden) and the positional bias, then
    fastmath.softmax, whose exp MLX's compiler vectorises (MLX's fused attention on CPU runs
    the same steps with its scalar exp). Equal to the inference path up to float rounding."""
    n_rep = queries.shape[1] // keys.shape[1]
    if n_rep > 1:  # grouped-query attention: each key/value head serves n_rep query heads
        keys, values = mx.repeat(keys, n_rep, axis=1), mx.repeat(values, n_rep, axis=1)
    mask = mx.where(visibility(reference, positions, positions), 0.0, -float("inf"))  # [L, L]
    if bias is not None:
        additive = bias(positions, positions)
        if additive is not None:
            mask = mask + additive.astype(queries.dtype)
    # addmm writes mask + q k^T contiguously in one BLAS call; an add fused into the softmax's
    # loop would make MLX generate a strided (unvectorised) kernel for the broadcast mask.
    scores = mx.addmm(mask.astype(queries.dtype), queries * scale, keys.swapaxes(-1, -2))  # [B, Hq, L, L]
    return fastmath.softmax(scores) @ values


def window_bias(window: int, inner: Optional[Bias] = None) -> Bias:
    """An additive bias that hides keys at or before q_pos - window (-inf there, 0 elsewhere),
    plus `inner` (a positional bias such as ALiBi) where that has one.

    A model's own sliding window, applied through the cache API's `bias` hook, from absolute
    positions: identical in the cached and the uncached forward, so every cache stays exact
    against its own reference on a windowed model, and a rotating cache of `window` slots
    with no sinks is exact against the true model at every length.
    """

    def bias(q_positions: mx.array, k_positions: mx.array) -> mx.array:
        q, k = q_positions[..., :, None], k_positions[..., None, :]
        hidden = mx.where(k > q - window, 0.0, -float("inf"))  # [Lq, Lk] or [B, Lq, Lk]
        if hidden.ndim == 3:
            hidden = hidden[:, None]  # [B, 1, Lq, Lk]: one window for every head
        extra = inner(q_positions, k_positions) if inner is not None else None
        return hidden if extra is None else hidden + extra

    return bias


def split_heads(x: mx.array, n_heads: int) -> mx.array:
    """[B, L, n_heads * D] -> [B, n_heads, L, D]."""
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """[B, H, L, D] -> [B, L, H * D]."""
    B, H, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * D)
