"""A quantized cache: keys and values stored with mx.quantize, attended with mx.quantized_matmul.

Groups narrower than mx.quantize's 32 (heads of 8 or 16 features, as in stories260K) use
kvzoo's own affine quantization on the same rounding conventions (caches/affine.py), attended
over the dequantized keys and values.

Each token's key (and value) vector is split into groups of `group_size` features; each group
is stored as `bits`-bit integers with one scale and one bias (affine quantization, as
mlx-lm's QuantizedKVCache). Attention multiplies the queries with the packed keys directly,
so the cache is never dequantized as a whole.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from . import affine
from .affine import affine_grid  # noqa: F401  (re-exported: the grid the rounding reference uses)
from .attention import Bias, scaled_dot_product_attention, visibility
from .base import KeyValueRows
from .reference import Reference
from .registry import register

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode supports (1 is too lossy)
MLX_GROUP_SIZES = (32, 64, 128)  # what mx.quantize / mx.quantized_matmul support
NARROW_GROUP_SIZES = (4, 8, 16)  # kvzoo's own (caches/affine.py), for heads narrower than 32
ALLOWED_GROUP_SIZES = NARROW_GROUP_SIZES + MLX_GROUP_SIZES
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
        allowed = ", ".join(map(str, fits)) if fits else "none (head_dim must be a multiple of 4)"
        raise ValueError(
            f"quantized cache: group_size {group_size} does not divide the head size {head_dim}; "
            f"group sizes that fit this model: {allowed}"
        )


def round_trip(x: mx.array, bits: int, group_size: int) -> mx.array:
    """x [..., D] quantized and dequantized per group of its last axis: what the cache stores
    (mx.quantize for its group sizes, caches/affine.py for narrower groups)."""
    if group_size in NARROW_GROUP_SIZES:
        return affine.round_trip(x, bits, group_size)
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
    if group_size in NARROW_GROUP_SIZES:
        return affine.step(x, bits, group_size)
    _, scales, _ = mx.quantize(x, group_size=group_size, bits=bits)
    return mx.repeat(scales, group_size, axis=-1).astype(mx.float32)  # [..., D]


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    groups = [g for g in MLX_GROUP_SIZES if head_dim % g == 0]
    if not groups:  # a head narrower than mx.quantize's groups: kvzoo's own packing
        narrow = [g for g in NARROW_GROUP_SIZES if head_dim % g == 0]
        if not narrow:
            return []
        return [{"bits": 4, "group_size": narrow[-1]},
                {"group_size": narrow[0], "key_bits": 8, "value_bits": 3}]
    return [
        {"bits": 4, "group_size": groups[-1]},
        {"bits": 8, "group_size": groups[0]},
        {"group_size": groups[0], "key_bits": 8, "value_bits": 3},
    ]


def _reference(cache: "QuantizedCache") -> QuantizedReference:
    return QuantizedReference(cache.bits, cache.group_size, cache.key_bits, cache.value_bits)


@register("quantized", reference=_reference, examples=_examples, exact=False, ragged=True)
class QuantizedCache(KeyValueRows):
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
        new_k = self._quantize(keys, self.key_bits)
        new_v = self._quantize(values, self.value_bits)
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
        keys = self._dequantize((kw, ks, kb), self.key_bits)
        values = self._dequantize((vw, vs, vb), self.value_bits)
        return keys.astype(ks.dtype), values.astype(vs.dtype)

    @property
    def narrow(self) -> bool:
        """True for groups narrower than mx.quantize's (kvzoo's own packing, caches/affine.py)."""
        return self.group_size in NARROW_GROUP_SIZES

    def _quantize(self, x: mx.array, bits: int) -> list[mx.array]:
        if self.narrow:
            return list(affine.quantize(x, bits, self.group_size))
        return list(mx.quantize(x, group_size=self.group_size, bits=bits))

    def _dequantize(self, triple, bits: int) -> mx.array:
        if self.narrow:
            return affine.dequantize(*triple, bits, self.group_size)
        return mx.dequantize(*triple, group_size=self.group_size, bits=bits)

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
        """Store, then softmax(q K^T * scale + bias, masked) V on the packed keys and values
        (narrow groups: on the keys and values dequantized, which mx.quantized_matmul cannot
        read)."""
        q_keys, q_values = self.update_and_fetch(keys, values)
        if self.narrow:
            keys = self._dequantize(q_keys, self.key_bits).astype(queries.dtype)
            values = self._dequantize(q_values, self.value_bits).astype(queries.dtype)
            # positions 0..offset-1 in order: MLX's causal fast path; ragged rows (padding):
            # each row's own positions, padding hidden (as Cache.attend does for every cache)
            in_order = self.keys_in_order and self.padding is None
            return scaled_dot_product_attention(
                queries, keys, values, scale=scale, q_positions=q_positions,
                k_positions=None if in_order else self.fetched_positions(),
                reference=self.reference, bias=bias)
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
            if self.padding is not None:  # ragged rows: one mask per forward, shared by the layers
                k_positions, mask = self.rows_visibility(q_positions)  # [B, S], [B, L, S]
            else:
                k_positions = self.fetched_positions()
                mask = visibility(self.reference, q_positions, k_positions)  # [L, S]
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
        and values alike, so different key and value widths are refused rather than misread, and
        mx.quantized_matmul cannot read groups narrower than 32."""
        if self.narrow:
            raise NotImplementedError(
                f"mlx-lm's quantized attention runs mx.quantized_matmul, which needs groups of "
                f"{MLX_GROUP_SIZES}; group_size={self.group_size} is kvzoo's own packing: use it "
                f"with kvzoo models")
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
        word, kind = (8, mx.uint8) if self.narrow else (32, mx.uint32)  # bits per packed element
        dk = state[0].shape[3] * word // self.key_bits
        dv = state[3].shape[3] * word // self.value_bits
        expected = [(dk * self.key_bits // word, kind), (dk // self.group_size, None),
                    (dk // self.group_size, None), (dv * self.value_bits // word, kind),
                    (dv // self.group_size, None), (dv // self.group_size, None)]
        dtype = state[1].dtype
        for a, (width, want) in zip(state, expected):
            if a.shape[:3] != state[0].shape[:3] or a.shape[2] != self.offset or a.shape[3] != width \
                    or a.dtype != (want or dtype):
                raise ValueError(f"quantized cache state arrays do not fit offset {self.offset}, "
                                 f"bits {self.key_bits}/{self.value_bits}, "
                                 f"group_size {self.group_size}")
        # Packed widths alone do not fix the head size (6-bit values of 64 features pack like
        # 4-bit values of 96); the layout the file saved does.
        if self._layout is not None and (dk, dv) != tuple(self._layout[2:4]):
            raise ValueError(f"quantized cache state unpacks to keys of {dk} and values of {dv} "
                             f"features at bits {self.key_bits}/{self.value_bits}, but its layout "
                             f"says {self._layout[2]} and {self._layout[3]}: saved at other widths?")
        self.keys, self.values = list(state[:3]), list(state[3:])

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in self.keys + self.values)

    def _trim(self, n):
        pass  # slots past the new offset are overwritten by the next update

    def __repr__(self) -> str:
        return (f"QuantizedCache(key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"group_size={self.group_size}, offset={self.offset})")
