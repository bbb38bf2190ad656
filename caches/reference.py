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
    `transform_kv` (what storing does to keys and values). A reference whose `transform_kv`
    rounds (quantization, half-precision storage) also overrides `rounding_step`, the size of one
    rounding step at each value; the conformance kit then accounts for values that sat on a
    rounding boundary by itself (`rounding_flips`), with no numerics of the cache's own.
    """

    def mask(self, q_positions: mx.array, k_positions: mx.array) -> mx.array:
        """Boolean visibility, shape [..., Lq, Lk]: True where query may read key."""
        return q_positions[..., :, None] >= k_positions[..., None, :]

    def transform_kv(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """What the cache's storage does to keys and values [B, Hkv, L, D]."""
        return keys, values

    def rounding_step(self, keys: mx.array, values: mx.array) -> Optional[tuple[mx.array, mx.array]]:
        """For a rounding `transform_kv`: the distance between neighbouring stored levels at each
        value of keys and values (same shapes); None (the default) for a reference that does
        not round."""
        return None

    def rounding_alternatives(self, keys: mx.array, values: mx.array) -> list:
        """Other roundings storage may legitimately have produced, where a whole group of values
        sat on a rounding boundary of a kind one step does not describe (quantized: a group's
        zero-point): [((keys', values'), (keys_applies, values_applies))], masks saying where
        each alternative applies. Default: none."""
        return []

    def positions_as_seen(self, q_positions: mx.array,
                          k_positions: mx.array) -> Optional[tuple[mx.array, mx.array]]:
        """For a cache that assigns positions itself (StreamingLLM: keys stored before RoPE and
        attended at their place in the cache): (query positions [Lq], key positions [Lq, Lk]),
        the position each query has and the one each key has for that query, at which RoPE
        rotates them and ALiBi measures distances. None (the default): the absolute positions.
        Only keys the query sees (`mask`) matter."""
        return None

    def layer(self, index: int) -> "Reference":
        """The reference of attention layer `index` (0 = first), for caches whose layers differ
        (eviction: each layer keeps the keys its own scores chose). Default: this one for all."""
        return self

    def rounded_for(self, q_positions: mx.array,
                    k_positions: mx.array) -> Optional[tuple[mx.array, mx.array]]:
        """For a reference where a query reads some keys rounded and others exact (KIVI: the
        most recent tokens in full precision): boolean (keys, values) [Lq, Lk], True where query
        reads the `transform_kv` (rounded) key or value, False where the exact one. None (the
        default): every query reads `transform_kv`'s."""
        return None

    @property
    def repositions(self) -> bool:
        """True when the reference assigns its own positions (`positions_as_seen`)."""
        return type(self).positions_as_seen is not Reference.positions_as_seen

    @property
    def mixes(self) -> bool:
        """True when queries read some keys rounded and some exact (`rounded_for`)."""
        return type(self).rounded_for is not Reference.rounded_for

    @property
    def causal(self) -> bool:
        """True when `mask` is plain causal visibility (attention may use MLX's fast paths)."""
        return type(self).mask is Reference.mask

    @property
    def rounds(self) -> bool:
        """True when `transform_kv` rounds (the reference overrides `rounding_step`)."""
        return type(self).rounding_step is not Reference.rounding_step

    def rounding_flips(self, computed: tuple[mx.array, mx.array],
                       stored: tuple[mx.array, mx.array]) -> tuple[int, Optional[str]]:
        """How `stored` (keys, values a cache holds) departs from `transform_kv(*computed)`.

        Returns (values one rounding step away, None) when every difference is a value that sat
        on a rounding boundary, else (0, what is wrong). Rounding is discontinuous: the chunked
        and the uncached forward compute keys that agree only to float summation order, and a
        key within that noise of a boundary rounds to neighbouring levels on the two sides.
        A stored value is explained when it is one step from the rounded oracle and the computed
        value lies near the midpoint between the two levels (the boundary, for round-to-nearest),
        within 1% of a step or within float32 summation noise; or when it is within that noise
        of the rounded oracle. The noise is 1e-5 of the largest value in the row: a small value
        that is a sum of large terms is known only to about that, which can be several of its
        own half-precision steps. A reference that does not round demands equality.
        """
        want = self.transform_kv(*computed)
        steps = self.rounding_step(*computed)
        if steps is None:
            same = all(mx.array_equal(a, b).item() for a, b in zip(want, stored))
            return 0, None if same else "stored keys/values are not the reference's"
        alternatives = self.rounding_alternatives(*computed)
        flips = 0
        for i, (name, x, rounded, kept, step) in enumerate(zip(("keys", "values"), computed, want, stored, steps)):
            x, rounded, kept = (a.astype(mx.float32) for a in (x, rounded, kept))
            step = mx.abs(step.astype(mx.float32))
            diff = mx.abs(kept - rounded)
            slack = 1e-3 * step + 1e-7
            off = diff > slack
            midpoint = (kept + rounded) / 2
            noise = 1e-5 * mx.max(mx.abs(x), axis=-1, keepdims=True)  # [..., 1]
            near = mx.abs(x - midpoint) <= mx.maximum(0.01 * step, noise) + slack
            explained = off & (((mx.abs(diff - step) <= slack) & near) | (diff <= noise))
            for values_alt, applies in alternatives:
                other = values_alt[i].astype(mx.float32)
                explained = explained | (off & applies[i] & (mx.abs(kept - other) <= 2e-3 * step + 1e-7))
            n_off, n_explained = off.sum().item(), explained.sum().item()
            if n_off > n_explained:
                return 0, (f"{n_off - n_explained} of {x.size} stored {name} differ from the rounded "
                           f"oracle by other than a one-step flip on a rounding boundary")
            flips += n_explained
        return flips, None

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
        self.stored = list(stored)
        self.computed: list[tuple[mx.array, mx.array]] = []

    def mask(self, q_positions, k_positions):
        return self.inner.mask(q_positions, k_positions)

    def rounding_alternatives(self, keys: mx.array, values: mx.array) -> list:
        """Other roundings storage may legitimately have produced, where a whole group of values
        sat on a rounding boundary of a kind one step does not describe (quantized: a group's
        zero-point): [((keys', values'), (keys_applies, values_applies))], masks saying where
        each alternative applies. Default: none."""
        return []

    @property
    def causal(self) -> bool:
        return self.inner.causal

    def rounded_for(self, q_positions, k_positions):
        return self.inner.rounded_for(q_positions, k_positions)

    @property
    def mixes(self) -> bool:
        return self.inner.mixes

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
