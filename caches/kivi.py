"""KIVI (Liu et al., 2024): keys quantized per channel, values per token, recent tokens exact.

Keys are quantized per channel over groups of `group_size` consecutive tokens (one scale and
bias per channel and group: outlier channels stay within their own range), values per token
over groups of min(group_size, head_dim) features, both with KIVI's own `bits`-bit min-max
quantizer (jy-yuan/KIVI, quant/new_pack.py: scale = (max - min) / (2^bits - 1), bias = min;
caches/affine.py, grid="minmax"; tests/test_literature.py checks it against a transcription).
The most recent `residual` tokens stay in full precision; tokens are quantized as they leave
that window: a value as soon as it is `residual` tokens old, a key group once its newest token
is (so between `residual` and `residual + group_size - 1` keys are exact).

Where KIVI's reference code (models/llama_kivi.py, LlamaAttention_KIVI.forward) differs, and
why: it schedules by buffer, not by age. At prefill it attends in full precision, then
quantizes the prompt's keys but the last T mod R and its values but the last R; while
decoding it appends to a full-precision key buffer and quantizes all of it when it reaches R
tokens (so 0..R-1 exact keys), and quantizes the oldest exact value after a query attended
(the query reads R + 1 exact values, R stay). Which keys a query reads exact then depends on
the prompt length and on how the prompt was chunked; here the rule is by age, per query, so
that the result does not depend on chunking and the oracle can state it (`rounded_for`). The
arithmetic is float32 (KIVI's runs in the model's dtype), and values on heads narrower than
`group_size` are grouped over the whole head (KIVI requires head_dim % group_size == 0).

Query p reads key k rounded iff (k // G + 1) * G - 1 <= p - R, and value k rounded iff
k <= p - R (G = group_size, R = residual): `KIVIReference.rounded_for`. A chunk's queries differ
in which keys they read rounded, so a chunk attends over both versions of the keys that cross
the line inside it; a single decoded token reads exactly what is stored.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from . import affine
from .attention import Bias, grouped_scores, grouped_values, masked_softmax
from .base import Cache
from .reference import Reference
from .registry import register


GRID = "minmax"  # KIVI's own quantizer (caches/affine.py): min and max of each group are levels


def key_rounded_count(n: int, group_size: int, residual: int) -> int:
    """Keys stored quantized after n tokens: the whole groups at least `residual` old for the
    latest query (position n - 1)."""
    return max(0, (n - residual) // group_size * group_size)


def value_rounded_count(n: int, residual: int) -> int:
    return max(0, n - residual)


def quantize_keys(keys: mx.array, bits: int, group_size: int):
    """keys [B, H, n, D] (n a multiple of group_size) -> per-channel groups along the tokens:
    (packed [B, H, D, n * bits / 8], scales [B, H, D, n / g], biases [B, H, D, n / g])."""
    return affine.quantize(keys.swapaxes(2, 3), bits, group_size, GRID)


def dequantize_keys(triple, bits: int, group_size: int) -> mx.array:
    return affine.dequantize(*triple, bits, group_size).swapaxes(2, 3)  # [B, H, n, D]


class KIVIReference(Reference):
    """Causal attention where query p reads key groups and values at least `residual` tokens
    old rounded (per channel / per token), the rest exact."""

    def __init__(self, bits: int, group_size: int, residual: int) -> None:
        self.bits, self.group_size, self.residual = bits, group_size, residual

    def value_group(self, head_dim: int) -> int:
        return min(self.group_size, head_dim)

    def _split(self, keys, values):
        L = keys.shape[2]
        return key_rounded_count(L, self.group_size, self.residual), value_rounded_count(L, self.residual)

    def transform_kv(self, keys, values):
        """Keys and values as stored once the whole sequence has been written (rounded where
        the last query reads them rounded)."""
        nk, nv = self._split(keys, values)
        out_k, out_v = keys, values
        if nk:
            rounded = affine.round_trip(keys[..., :nk, :].swapaxes(2, 3), self.bits, self.group_size, GRID)
            out_k = mx.concatenate([rounded.swapaxes(2, 3).astype(keys.dtype), keys[..., nk:, :]], axis=2)
        if nv:
            rounded = affine.round_trip(values[..., :nv, :], self.bits, self.value_group(values.shape[-1]), GRID)
            out_v = mx.concatenate([rounded, values[..., nv:, :]], axis=2)
        return out_k, out_v

    def rounded_for(self, q_positions, k_positions):
        q, k = q_positions[:, None], k_positions[None, :]
        key_r = (k // self.group_size + 1) * self.group_size - 1 + self.residual <= q
        value_r = k + self.residual <= q
        return key_r, value_r

    def rounding_step(self, keys, values):
        nk, nv = self._split(keys, values)
        step_k = mx.zeros(keys.shape, mx.float32)
        step_v = mx.zeros(values.shape, mx.float32)
        if nk:
            s = affine.step(keys[..., :nk, :].swapaxes(2, 3), self.bits, self.group_size, GRID).swapaxes(2, 3)
            step_k = mx.concatenate([s, step_k[..., nk:, :]], axis=2)
        if nv:
            s = affine.step(values[..., :nv, :], self.bits, self.value_group(values.shape[-1]), GRID)
            step_v = mx.concatenate([s, step_v[..., nv:, :]], axis=2)
        return step_k, step_v

    def __repr__(self) -> str:
        return f"KIVIReference(bits={self.bits}, group_size={self.group_size}, residual={self.residual})"


def _examples(head_dim: int, seq_len: int) -> list[dict]:
    return [{"bits": 2, "group_size": 4, "residual": max(1, seq_len // 4)},
            {"bits": 4, "group_size": 2, "residual": 3}]


@register("kivi", reference=lambda c: KIVIReference(c.bits, c.group_size, c.residual),
          examples=_examples, exact=False)
class KIVICache(Cache):
    """Per-channel keys and per-token values at `bits` bits, the last `residual` tokens exact
    (module docstring). Memory per token and kv head, D = head_dim, g = min(group_size, D),
    once quantized: D * bits / 8 * 2 bytes packed + 2 * itemsize * (D / group_size + D / g) for
    scales and biases; the residual window in the input dtype. 4-bit, group 32, D = 64, fp16:
    31% of an fp16 cache at long context, 40% at 1,024 tokens with residual 128 (docs/caches.md).
    Trimmable while nothing is quantized (offset <= residual)."""

    def __init__(self, bits: int = 4, group_size: int = 32, residual: int = 128) -> None:
        super().__init__()
        affine.check(bits, group_size)
        if not isinstance(residual, int) or isinstance(residual, bool) or residual < 1:
            raise ValueError(f"kivi cache: residual must be an int >= 1, got {residual!r}")
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.key_q: Optional[list] = None  # (packed, scales, biases) of the quantized key groups
        self.value_q: Optional[list] = None  # (packed, scales, biases) of the quantized values
        self.key_full: Optional[mx.array] = None  # [B, H, n, D] exact keys after the quantized ones
        self.value_full: Optional[mx.array] = None

    def _value_group(self, head_dim: int) -> int:
        return min(self.group_size, head_dim)

    def check_model(self, model) -> None:
        D = model.config.head_dim
        g = self._value_group(D)
        if D % g or D * self.bits % 8 or self.group_size * self.bits % 8:
            raise ValueError(f"kivi cache: values of head size {D} do not split into groups of {g} "
                             f"packed at {self.bits} bits (and key groups of {self.group_size} tokens "
                             f"must pack into whole bytes)")

    def _check(self, keys, values):
        if keys.dtype not in (mx.float32, mx.float16, mx.bfloat16):
            raise TypeError(f"kivi cache stores float keys and values, got {keys.dtype}")
        D = values.shape[3]
        g = self._value_group(D)
        if D % g or D * self.bits % 8 or self.group_size * self.bits % 8:
            raise ValueError(f"kivi cache: values of head size {D} do not split into groups of {g} "
                             f"packed at {self.bits} bits")

    # -- storage ---------------------------------------------------------------------------

    def _deq_keys(self) -> Optional[mx.array]:
        return None if self.key_q is None else dequantize_keys(self.key_q, self.bits, self.group_size)

    def _deq_values(self) -> Optional[mx.array]:
        if self.value_q is None:
            return None
        return affine.dequantize(*self.value_q, self.bits, self._value_group(self.value_q[0].shape[-1] * 8 // self.bits))

    def _append(self, keys, values):
        """Store, quantizing what left the window; return (rounded, exact) views for attention:
        ((keys as the last query reads them, keys as exact as kept), same for values)."""
        prev, L = self.offset, keys.shape[2]
        end = prev + L
        nk0, nv0 = key_rounded_count(prev, self.group_size, self.residual), value_rounded_count(prev, self.residual)
        nk1, nv1 = key_rounded_count(end, self.group_size, self.residual), value_rounded_count(end, self.residual)
        tail_k = keys if self.key_full is None else mx.concatenate([self.key_full, keys], axis=2)  # from nk0
        tail_v = values if self.value_full is None else mx.concatenate([self.value_full, values], axis=2)  # from nv0
        old_k, old_v = self._deq_keys(), self._deq_values()
        new_k = new_v = None
        if nk1 > nk0:
            new_kq = quantize_keys(tail_k[..., : nk1 - nk0, :], self.bits, self.group_size)
            new_k = dequantize_keys(new_kq, self.bits, self.group_size).astype(keys.dtype)
            self.key_q = list(new_kq) if self.key_q is None else [
                mx.concatenate([a, b], axis=-1) for a, b in zip(self.key_q, new_kq)]
        if nv1 > nv0:
            new_vq = affine.quantize(tail_v[..., : nv1 - nv0, :], self.bits, self._value_group(values.shape[3]), GRID)
            new_v = affine.dequantize(*new_vq, self.bits, self._value_group(values.shape[3])).astype(values.dtype)
            self.value_q = list(new_vq) if self.value_q is None else [
                mx.concatenate([a, b], axis=-2) for a, b in zip(self.value_q, new_vq)]
        self.key_full = tail_k[..., nk1 - nk0 :, :]
        self.value_full = tail_v[..., nv1 - nv0 :, :]

        def joined(*parts):
            parts = [p for p in parts if p is not None and p.shape[2]]
            return mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]

        rounded = (joined(old_k, new_k, self.key_full), joined(old_v, new_v, self.value_full))
        exact = (joined(old_k, tail_k), joined(old_v, tail_v))
        return rounded, exact

    def stored_kv(self):
        """Keys and values [B, H, offset, D] as stored: rounded where quantized, else exact."""
        if self.key_full is None:
            return None
        return (mx.concatenate([a for a in (self._deq_keys(), self.key_full) if a is not None], axis=2),
                mx.concatenate([a for a in (self._deq_values(), self.value_full) if a is not None], axis=2))

    # -- attention -------------------------------------------------------------------------

    def attend(self, queries, keys, values, *, scale: float, q_positions: mx.array,
               bias: Optional[Bias] = None) -> mx.array:
        """Store, then attend: each query reads each key and value rounded or exact as
        `KIVIReference.rounded_for` says (one query: exactly what is stored)."""
        (k_r, v_r), (k_e, v_e) = self.update_and_fetch(keys, values)
        L = queries.shape[2]
        k_positions = mx.arange(self.offset, dtype=mx.int32)
        additive = None if bias is None else bias(q_positions, k_positions)
        visible = q_positions[:, None] >= k_positions[None, :]
        if L == 1:
            weights = masked_softmax(grouped_scores(queries, k_r, scale), visible, additive)
            return grouped_values(weights.astype(v_r.dtype), v_r)
        key_r, value_r = self.reference.rounded_for(q_positions, k_positions)
        scores = mx.where(key_r, grouped_scores(queries, k_r, scale), grouped_scores(queries, k_e, scale))
        weights = masked_softmax(scores, visible, additive).astype(v_r.dtype)
        return (grouped_values(mx.where(value_r, weights, 0), v_r)
                + grouped_values(mx.where(value_r, 0, weights), v_e))

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        raise NotImplementedError(
            "mlx-lm's models attend over what update_and_fetch returns as plain or mx.quantize "
            "keys; kivi's per-channel key groups and mixed rounded/exact keys need its own "
            "attention: use it with kvzoo models")

    # -- life-cycle ------------------------------------------------------------------------

    @property
    def state(self):
        if self.key_full is None:
            return ()
        empty = lambda: (mx.zeros((0,), mx.uint8),) * 3  # noqa: E731
        return (tuple(self.key_q) if self.key_q else empty()) + (tuple(self.value_q) if self.value_q else empty()) \
            + (self.key_full, self.value_full)

    def _restore(self, state):
        if len(state) != 8:
            raise ValueError("kivi cache state must be 8 arrays: key (packed, scales, biases), "
                             "value (packed, scales, biases), exact keys, exact values")
        key_full, value_full = state[6], state[7]
        nk = key_rounded_count(self.offset, self.group_size, self.residual)
        nv = value_rounded_count(self.offset, self.residual)
        if key_full.ndim != 4 or key_full.shape[2] != self.offset - nk or value_full.shape[2] != self.offset - nv:
            raise ValueError(f"kivi cache state does not fit offset {self.offset}, group_size "
                             f"{self.group_size}, residual {self.residual}")
        self.key_q = list(state[:3]) if nk else None
        self.value_q = list(state[3:6]) if nv else None
        self.key_full, self.value_full = key_full, value_full

    def _trim_refusal(self) -> Optional[str]:
        if self.offset > self.residual:
            return (f"once tokens have been quantized (offset {self.offset} > residual "
                    f"{self.residual}): their exact values are gone")
        return None

    def trim_horizon(self) -> Optional[int]:
        return self.residual

    def _trim(self, n):
        self.key_full = self.key_full[..., : self.offset - n, :]
        self.value_full = self.value_full[..., : self.offset - n, :]
