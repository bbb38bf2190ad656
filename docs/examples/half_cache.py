"""A rounding cache in one small file: keys and values stored in float16 (docs/architecture.md).

Its reference says what storing does (round to float16) and how big one rounding step is; the
conformance kit does the rest, including values that sat on a rounding boundary, so the cache
passes under every BLAS with no numerics of its own.

    kvzoo check --plugin docs/examples/half_cache.py --caches half
"""

import mlx.core as mx

import caches


def half_step(x):
    """The spacing of float16 numbers around each value of x (one unit in the last place)."""
    exponent = mx.floor(mx.log2(mx.maximum(mx.abs(x.astype(mx.float32)), 2.0**-14)))
    return mx.power(2.0, exponent - 10)  # 10 fraction bits; subnormals below 2**-14


class HalfReference(caches.Reference):
    """The uncached model on keys and values rounded to float16."""

    def transform_kv(self, keys, values):
        return keys.astype(mx.float16).astype(keys.dtype), values.astype(mx.float16).astype(values.dtype)

    def rounding_step(self, keys, values):
        return half_step(keys), half_step(values)


@caches.register("half", reference=lambda cache: HalfReference(), exact=False)
class HalfCache(caches.Cache):
    """Half the memory of a float32 cache; attention reads the stored values in float32."""

    def __init__(self):
        super().__init__()
        self.keys = self.values = None

    def _append(self, keys, values):
        k, v = keys.astype(mx.float16), values.astype(mx.float16)
        if self.keys is not None:
            k = mx.concatenate([self.keys, k], axis=2)
            v = mx.concatenate([self.values, v], axis=2)
        self.keys, self.values = k, v
        return k.astype(keys.dtype), v.astype(values.dtype)

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)

    def _restore(self, state):
        self.keys, self.values = state

    def _trim(self, n):
        self.keys, self.values = self.keys[..., : self.offset - n, :], self.values[..., : self.offset - n, :]
