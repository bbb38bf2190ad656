"""A quantized cache: keys and values stored with mx.quantize, attended with mx.quantized_matmul.

Each token's key (and value) vector is split into groups of `group_size` features; each group
is stored as `bits`-bit integers with one scale and one bias (affine quantization, as
mlx-lm's QuantizedKVCache). Attention multiplies the queries with the packed keys directly,
so the cache is never dequantized as a whole.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .attention import Bias, visibility
from .base import Cache
from .reference import Reference
from .registry import register

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode supports (1 is too lossy)
ALLOWED_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def check_quantization(bits: Any, group_size: Any, what: str = "bits") -> None:
    """Raise ValueError unless (bits, group_size) is something mx.quantize supports."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"quantized cache: {what} must be one of {ALLOWED_BITS}, got {bits!r}")
    if (not isinstance(group_size, int) or isinstance(group_size, bool)
            or group_size not in ALLOWED_GROUP_SIZES):
        raise ValueError(
            f"quantized cache: group_size must be one of {ALLOWED_GROUP_SIZES}, got {group_size!r}"
        )


def check_head_dim(head_dim: int, group_size: int) -> None:
    """Raise ValueError unless head vectors of `head_dim` split into groups of `group_size`."""
    if head_dim % group_size:
        fits = [g for g in ALLOWED_GROUP_SIZES if head_dim % g == 0]
        allowed = ", ".join(map(str, fits)) if fits else "none (head_dim must be a multiple of 32)"
        raise ValueError(
            f"quantized cache: group_size {group_size} does not divide the head size {head_dim}; "
            f"group sizes that fit this model: {allowed}"
        )


def affine_grid(x: mx.array, bits: int, group_size: int, *,
                other_side: bool = False) -> tuple[mx.array, mx.array]:
    """(x [..., D] rounded on mx.quantize's affine grid, or with `other_side` on the grid it
    would pick had its zero-point rounding gone the other way; whether each value's group sat
    on that rounding boundary).

    mx.quantize makes zero a level of each group: with edge = the min or max of the group
    (whichever is larger in magnitude) and s = (max - min) / (2^bits - 1), it rounds
    q0 = edge / s and uses scale = edge / q0, bias = edge. When edge / s is a half-integer,
    float noise picks q0, and the whole group's grid moves (found by the property test on a
    group with edge / s = -130.5000). With other_side=False this is mx.quantize followed by
    mx.dequantize, value for value (tests/test_quantized.py).
    """
    g = x.astype(mx.float32).reshape(*x.shape[:-1], -1, group_size)  # [..., G, group_size]
    n_levels = 2**bits - 1
    low, high = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = mx.maximum((high - low) / n_levels, 1e-7)
    side = mx.abs(low) > mx.abs(high)
    scale = mx.where(side, scale, -scale)
    edge = mx.where(side, low, high)
    ratio = edge / scale
    q0 = mx.round(ratio)
    if other_side:
        q0 = mx.where(ratio - mx.floor(ratio) < 0.5, q0 + 1, q0 - 1)  # the other neighbour of ratio
    on_boundary = mx.abs(ratio - mx.floor(ratio) - 0.5) <= 0.01
    scale = mx.where(q0 != 0, edge / mx.where(q0 != 0, q0, 1), scale)
    bias = mx.where(q0 == 0, 0, edge)
    levels = mx.clip(mx.round((g - bias) / scale), 0, n_levels)
    other = (levels * scale + bias).reshape(x.shape)
    return other, mx.broadcast_to(on_boundary, g.shape).reshape(x.shape)


def round_trip(x: mx.array, bits: int, group_size: int) -> mx.array:
    """x [..., D] quantized and dequantized per group of its last axis: what the cache stores."""
    packed = mx.quantize(x, group_size=group_size, bits=bits)
    return mx.dequantize(*packed, group_size=group_size, bits=bits).astype(x.dtype)


class QuantizedReference(Reference):
    """Causal attention over keys and values rounded through quantize/dequantize per token."""

    def __init__(self, bits: int, group_size: int, key_bits: Optional[int] = None,
                 value_bits: Optional[int] = None) -> None:
        self.group_size = group_size
        self.key_bits = bits if key_bits is None else key_bits
        self.value_bits = bits if value_bits is None else value_bits

    def transform_kv(self, keys, values):
        return (round_trip(keys, self.key_bits, self.group_size),
                round_trip(values, self.value_bits, self.group_size))

    def rounding_step(self, keys, values):
        """One quantization step per value: the scale of its group."""
        return (quantization_step(keys, self.key_bits, self.group_size),
                quantization_step(values, self.value_bits, self.group_size))

    def rounding_alternatives(self, keys, values):
        """A group whose zero-point rounding sat on its boundary may hold the other grid's
        rounding (see affine_grid): that grid, where it applies."""
        k_other, k_applies = affine_grid(keys, self.key_bits, self.group_size, other_side=True)
        v_other, v_applies = affine_grid(values, self.value_bits, self.group_size, other_side=True)
        return [((k_other, v_other), (k_applies, v_applies))]

    def __repr__(self) -> str:
        return (f"QuantizedReference(key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"group_size={self.group_size})")


def quantization_step(x: mx.array, bits: int, group_size: int) -> mx.array:
    """The distance between neighbouring levels at each value of x [..., D]: its group's scale."""
    _, scales, _ = mx.quantize(x, group_size=group_size, bits=bits)
    return mx.repeat(scales, group_size, axis=-1).astype(mx.float32)  # [..., D]


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    groups = [g for g in ALLOWED_GROUP_SIZES if head_dim % g == 0]
    if not groups:
        return []
    return [
        {"bits": 4, "group_size": groups[-1]},
        {"bits": 8, "group_size": groups[0]},
        {"group_size": groups[0], "key_bits": 8, "value_bits": 3},
    ]


def _reference(cache: "QuantizedCache") -> QuantizedReference:
    return QuantizedReference(cache.bits, cache.group_size, cache.key_bits, cache.value_bits)


@register("quantized", reference=_reference, examples=_examples, exact=False, ragged=True)
class QuantizedCache(Cache):
    """Keys and values as `bits`-bit integers with a scale and bias per `group_size` features.

    `key_bits`/`value_bits` (default: `bits`) set the two widths separately. Exact against
    `QuantizedReference` (the uncached model on rounded keys/values); approximate against the
    true model, with the drift measured in docs/caches.md.
    Memory per token and kv head: 2 * (D * bits / 8 + 2 * (D / group_size) * itemsize) bytes
    (with key/value widths averaged); 4-bit, group 64, fp16: 28% of an fp16 cache.
    The buffers grow `step` tokens at a time, like `preallocated`.
    """

    def __init__(self, bits: int = 4, group_size: int = 64, key_bits: Optional[int] = None,
                 value_bits: Optional[int] = None, step: int = 256) -> None:
        super().__init__()
        check_quantization(bits, group_size)
        key_bits = bits if key_bits is None else key_bits
        value_bits = bits if value_bits is None else value_bits
        check_quantization(key_bits, group_size, "key_bits")
        check_quantization(value_bits, group_size, "value_bits")
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"quantized cache: step must be an int >= 1, got {step!r}")
        self.bits, self.group_size, self.step = bits, group_size, step
        self.key_bits, self.value_bits = key_bits, value_bits
        self.keys: Optional[list[mx.array]] = None  # [packed, scales, biases], each [B, H, S, *]
        self.values: Optional[list[mx.array]] = None

    def check_model(self, model: Any) -> None:
        check_head_dim(model.config.head_dim, self.group_size)

    def _check(self, keys, values):
        if keys.dtype not in FLOAT_DTYPES:
            raise TypeError(f"quantized cache stores float keys and values, got {keys.dtype}")
        check_head_dim(keys.shape[3], self.group_size)
        check_head_dim(values.shape[3], self.group_size)

    # -- storage ---------------------------------------------------------------------------

    def _append(self, keys, values):
        """Quantize and append keys/values [B, Hkv, L, D]; return the packed (w, scales,
        biases) triples of every stored token."""
        prev, L = self.offset, keys.shape[2]
        new_k = mx.quantize(keys, group_size=self.group_size, bits=self.key_bits)
        new_v = mx.quantize(values, group_size=self.group_size, bits=self.value_bits)
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            self._grow(prev + L, new_k, new_v)
        for buffer, new in zip(self.keys + self.values, new_k + new_v):
            buffer[..., prev : prev + L, :] = new
        return self._fetch(prev + L)

    def stored_kv(self) -> Optional[tuple[mx.array, mx.array]]:
        """Keys and values as attention reads them: dequantized, [B, Hkv, offset, D]."""
        if self.keys is None:
            return None
        (kw, ks, kb), (vw, vs, vb) = self._fetch(self.offset)
        keys = mx.dequantize(kw, ks, kb, group_size=self.group_size, bits=self.key_bits)
        values = mx.dequantize(vw, vs, vb, group_size=self.group_size, bits=self.value_bits)
        return keys.astype(ks.dtype), values.astype(vs.dtype)

    def _fetch(self, n: int) -> tuple[tuple, tuple]:
        return (tuple(a[..., :n, :] for a in self.keys), tuple(a[..., :n, :] for a in self.values))

    def _grow(self, needed: int, new_k, new_v) -> None:
        slots = (needed + self.step - 1) // self.step * self.step

        def grown(old: Optional[mx.array], like: mx.array) -> mx.array:
            B, H, _, width = like.shape
            if old is None:
                return mx.zeros((B, H, slots, width), like.dtype)
            extra = mx.zeros((B, H, slots - self.offset, width), like.dtype)
            return mx.concatenate([old[..., : self.offset, :], extra], axis=2)

        if self.keys is None:
            self.keys = [grown(None, a) for a in new_k]
            self.values = [grown(None, a) for a in new_v]
        else:
            self.keys = [grown(old, a) for old, a in zip(self.keys, new_k)]
            self.values = [grown(old, a) for old, a in zip(self.values, new_v)]

    # -- attention -------------------------------------------------------------------------

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        scale: float,
        q_positions: mx.array,
        bias: Optional[Bias] = None,
    ) -> mx.array:
        """Store, then softmax(q K^T * scale + bias, masked) V on the packed keys and values."""
        q_keys, q_values = self.update_and_fetch(keys, values)
        B, Hq, L, D = queries.shape
        Hkv = q_keys[0].shape[1]
        n_rep = Hq // Hkv
        q = (queries * scale).reshape(B, Hkv, n_rep, L, D)  # query head h = kv head h // n_rep
        if L == 1:
            # One query: a kv head's n_rep query heads are n_rep rows of one product, so each
            # packed key is read once instead of broadcast n_rep times (same arithmetic).
            scores = mx.quantized_matmul(q[..., 0, :], *q_keys, transpose=True,
                                         group_size=self.group_size,
                                         bits=self.key_bits)[..., None, :]  # [B, Hkv, n_rep, 1, S]
        else:
            q_keys = tuple(a[:, :, None] for a in q_keys)  # [B, Hkv, 1, S, *]
            q_values = tuple(a[:, :, None] for a in q_values)
            scores = mx.quantized_matmul(q, *q_keys, transpose=True, group_size=self.group_size,
                                         bits=self.key_bits)  # [B, Hkv, n_rep, L, S]
        S = scores.shape[-1]
        if L > 1 or bias is not None or self.padding is not None:
            k_positions = self.fetched_positions()
            mask = visibility(self.reference, q_positions, k_positions)  # [L, S] or [B, L, S]
            if mask.ndim == 3:
                mask = mask[:, None, None]  # [B, 1, 1, L, S]
            if bias is not None:
                additive = bias(q_positions, k_positions)  # [Hq, L, S] or [B, Hq, L, S]
                if additive is not None:
                    if additive.ndim >= 3 and additive.shape[-3] == Hq:  # per query head
                        additive = additive.reshape(*additive.shape[:-3], Hkv, n_rep, L, S)
                    elif additive.ndim >= 3:  # one head axis of size 1: broadcast it
                        additive = mx.expand_dims(additive, -3)
                    scores = scores + additive.astype(scores.dtype)
            scores = mx.where(mask, scores, mx.array(-float("inf"), scores.dtype))
        weights = mx.softmax(scores, axis=-1, precise=True)
        if L == 1:
            weights = weights[..., 0, :]  # [B, Hkv, n_rep, S]: rows again
        out = mx.quantized_matmul(weights, *q_values, transpose=False,
                                  group_size=self.group_size, bits=self.value_bits)
        return out.reshape(B, Hq, L, -1)  # [B, Hkv, n_rep, (L,) Dv] -> [B, Hq, L, Dv]

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        """mlx-lm's hook. mlx-lm's quantized attention reads `bits` and `group_size` for keys
        and values alike, so different key and value widths are refused rather than misread."""
        if self.key_bits != self.value_bits:
            raise NotImplementedError(
                f"mlx-lm's quantized attention uses one bit width for keys and values; this cache "
                f"has key_bits={self.key_bits}, value_bits={self.value_bits}: use it with kvzoo models")
        return super().make_mask(N, return_array=return_array, window_size=window_size)

    # -- life-cycle ------------------------------------------------------------------------

    @property
    def state(self):
        if self.keys is None:
            return ()
        keys, values = self._fetch(self.offset)
        return keys + values

    def _restore(self, state):
        if len(state) != 6 or not all(isinstance(a, mx.array) and a.ndim == 4 for a in state):
            raise ValueError("quantized cache state must be six 4-d arrays: key and value "
                             "(packed, scales, biases)")
        dk = state[0].shape[3] * 32 // self.key_bits
        dv = state[3].shape[3] * 32 // self.value_bits
        expected = [(dk * self.key_bits // 32, mx.uint32), (dk // self.group_size, None),
                    (dk // self.group_size, None), (dv * self.value_bits // 32, mx.uint32),
                    (dv // self.group_size, None), (dv // self.group_size, None)]
        dtype = state[1].dtype
        for a, (width, want) in zip(state, expected):
            if a.shape[:3] != state[0].shape[:3] or a.shape[2] != self.offset or a.shape[3] != width \
                    or a.dtype != (want or dtype):
                raise ValueError(f"quantized cache state arrays do not fit offset {self.offset}, "
                                 f"bits {self.key_bits}/{self.value_bits}, "
                                 f"group_size {self.group_size}")
        self.keys, self.values = list(state[:3]), list(state[3:])

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in self.keys + self.values)

    def _select_rows(self, index):
        self._take_rows(index, "keys", "values")

    def _extend_rows(self, other, width, padding):
        self._stack_rows(other, width, "keys", "values")

    def _trim(self, n):
        pass  # slots past the new offset are overwritten by the next update

    def __repr__(self) -> str:
        return (f"QuantizedCache(key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"group_size={self.group_size}, offset={self.offset})")
