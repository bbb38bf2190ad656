"""What the uncached oracle must do to reproduce a cache exactly.

Every cache declares a `Reference`. The uncached forward takes the same object
(`model(tokens, reference=cache.reference)`), so the oracle for any cache is one call.
"""

from __future__ import annotations

import mlx.core as mx


class Reference:
    """The true uncached model: causal visibility, keys and values exactly as computed.

    Subclasses override `mask` (which keys a query may see, by absolute position) and/or
    `transform_kv` (what storing does to keys and values, e.g. quantization rounding).
    Set `causal = False` when `mask` is anything other than plain causal visibility.
    """

    causal: bool = True

    def mask(self, q_positions: mx.array, k_positions: mx.array) -> mx.array:
        """Boolean visibility, shape [..., Lq, Lk]: True where query may read key."""
        return q_positions[..., :, None] >= k_positions[..., None, :]

    def transform_kv(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """What the cache's storage does to keys and values [B, Hkv, L, D]."""
        return keys, values

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


EXACT = Reference()
"""The reference of every exact cache: the plain uncached forward."""
