"""What the uncached oracle must do to reproduce a cache exactly.

Every cache declares a `Reference`. The uncached forward takes the same object
(`model(tokens, reference=cache.reference)`), so the oracle for any cache is one call.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx


class Reference:
    """The true uncached model: causal visibility, keys and values exactly as computed.

    Subclasses override `mask` (which keys a query may see, by absolute position) and/or
    `transform_kv` (what storing does to keys and values, e.g. quantization rounding).
    Set `causal = False` when `mask` is anything other than plain causal visibility, and
    `rounds = True` when `transform_kv` rounds (see `rounding_flips`).
    """

    causal: bool = True
    rounds: bool = False

    def mask(self, q_positions: mx.array, k_positions: mx.array) -> mx.array:
        """Boolean visibility, shape [..., Lq, Lk]: True where query may read key."""
        return q_positions[..., :, None] >= k_positions[..., None, :]

    def transform_kv(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """What the cache's storage does to keys and values [B, Hkv, L, D]."""
        return keys, values

    def rounding_flips(self, computed: tuple[mx.array, mx.array],
                       stored: tuple[mx.array, mx.array]) -> tuple[int, Optional[str]]:
        """How `stored` (keys, values a cache holds) departs from `transform_kv(*computed)`.

        Returns (values one rounding step away, None) when every difference is a value that sat
        on a rounding boundary, else (0, what is wrong). Rounding is discontinuous: the chunked
        and the uncached forward compute keys that agree only to float summation order, and a
        key within that noise of a boundary rounds to neighbouring levels on the two sides.
        A reference that rounds overrides this; the default demands equality.
        """
        want = self.transform_kv(*computed)
        same = all(mx.array_equal(a, b).item() for a, b in zip(want, stored))
        return 0, None if same else "stored keys/values are not the reference's"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StoredReference(Reference):
    """The uncached forward over what a cache actually stored.

    Layer i's `transform_kv` records the keys and values the forward computed and returns
    `stored[i]`, the cache's own (dequantized) keys and values in position order; masks are the
    cache's reference's. `flips()` then asks that reference whether every stored value is its
    rounding of the computed one, up to values on a rounding boundary. Used by
    `caches.conformance` when a rounding reference and the cache disagree.
    """

    def __init__(self, inner: Reference, stored: Sequence[tuple[mx.array, mx.array]]) -> None:
        self.inner = inner
        self.causal = inner.causal
        self.stored = list(stored)
        self.computed: list[tuple[mx.array, mx.array]] = []

    def mask(self, q_positions, k_positions):
        return self.inner.mask(q_positions, k_positions)

    def transform_kv(self, keys, values):
        layer = len(self.computed)
        if layer >= len(self.stored):
            raise ValueError(f"the forward has more attention layers than the {len(self.stored)} stored")
        want = self.stored[layer]
        if want[0].shape != keys.shape or want[1].shape != values.shape:
            raise ValueError(f"layer {layer}: the cache stored keys {want[0].shape} and values "
                             f"{want[1].shape}, the forward computed {keys.shape} and {values.shape}")
        self.computed.append((keys, values))
        return want

    def flips(self) -> tuple[int, Optional[str]]:
        """Values one rounding step from the reference's rounding, over every layer; or
        (0, what is wrong) when something else differs."""
        total = 0
        for layer, (computed, stored) in enumerate(zip(self.computed, self.stored)):
            n, problem = self.inner.rounding_flips(computed, stored)
            if problem:
                return 0, f"layer {layer}: {problem}"
            total += n
        return total, None


EXACT = Reference()
"""The reference of every exact cache: the plain uncached forward."""
