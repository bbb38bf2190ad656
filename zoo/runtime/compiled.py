"""A compiled decode step (`mx.compile`) for models whose every layer has a preallocated cache.

A plain decode step rebuilds the graph of the whole model in Python for every token (about 0.5
ms for stories260K's 5 layers, comparable to evaluating it) and runs every element-wise op as
its own kernel. `mx.compile` traces the step once per buffer shape and replays it, fusing
element-wise chains. That needs static shapes, so the compiled step differs from the plain one
in one way: attention reads the cache's whole preallocated buffer, with the slots past the
current position hidden by the causal mask (query position >= key position), instead of a
slice of it. Keys and values are written with `mx.slice_update` at the offset (an array input,
so the trace never bakes a position in), and the buffers are inputs and outputs of the step.

Result: the same tokens, and logits equal to the plain step's up to float summation order (the
masked slots weigh exactly 0; tests/test_compiled.py checks logits within 1e-5 and identical
greedy tokens for every family and positional scheme).

When it applies (`eligible`): every layer cache is exactly a `PreallocatedCache` that already
holds a buffer with room for the token, batch 1, one token per step, no speculative decoding,
and the buffer's empty tail is at most max(step, offset) slots (a growing buffer's always is; a
large fixed `capacity` runs plain until it is half full, so attention never reads more than
about twice the keys it needs).
Otherwise, or with `KVZOO_COMPILE=off`, the generation loop runs the plain step. The step that
fills a buffer runs plain (the cache grows its buffer), and the next shape is traced once.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx

from caches import EXACT, scaled_dot_product_attention
from caches.preallocated import PreallocatedCache

ENV_VAR = "KVZOO_COMPILE"


def enabled() -> bool:
    """False when KVZOO_COMPILE turns the compiled decode step off (read at every call)."""
    return os.environ.get(ENV_VAR, "auto").strip().lower() not in ("off", "0", "no", "false", "none")


class _Slot:
    """One layer's buffers inside the traced step: what `zoo.layers.attend` calls `cache`."""

    rotates_keys = False  # keys arrive rotated, as for a PreallocatedCache (caches.Cache's default)

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset  # [B, Hkv, S, D], int32 [1]

    def attend(self, queries, keys, values, *, scale, q_positions, bias=None):
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        slots = mx.arange(self.keys.shape[2], dtype=mx.int32)  # slot s holds position s
        # The causal mask hides the slots not yet written (positions past the query's).
        return scaled_dot_product_attention(queries, self.keys, self.values, scale=scale,
                                            q_positions=q_positions, k_positions=slots,
                                            reference=EXACT, bias=bias)


class CompiledDecoder:
    """`decoder(token [1], caches)` -> logits [1, V], the caches updated as the plain step does."""

    def __init__(self, model: Any):
        from ..layers import Context

        self.model = model

        def step(token: mx.array, offset: mx.array, *buffers: mx.array) -> tuple[mx.array, ...]:
            slots = [_Slot(buffers[i], buffers[i + 1], offset) for i in range(0, len(buffers), 2)]
            positions = offset + mx.arange(token.shape[1], dtype=mx.int32)  # [1]
            ctx = Context(positions, model.positional, EXACT, window=model.config.sliding_window)
            logits = model.forward(token, ctx, slots)[:, -1, :]  # [1, V]
            return (logits, *[a for slot in slots for a in (slot.keys, slot.values)])

        self._step: Callable = mx.compile(step)
        self.failed: Optional[BaseException] = None

    @staticmethod
    def wanted(model: Any) -> bool:
        """Whether to build a compiled step for this model at all (cheap: tracing is lazy)."""
        return enabled() and hasattr(model, "forward") and hasattr(model, "positional")

    @staticmethod
    def eligible(model: Any, layer_caches: Sequence[Any]) -> bool:
        """True when the compiled step can take the next token for these caches."""
        if not enabled() or len(layer_caches) != len(model.layers):
            return False
        for cache in layer_caches:
            if type(cache) is not PreallocatedCache or cache.keys is None:
                return False
            slots = cache.keys.shape[2]
            if cache.keys.shape[0] != 1 or cache.offset + 1 > slots:
                return False  # batch > 1, or the buffer is full: the plain step grows it
            if slots - cache.offset > max(cache.step, cache.offset):
                return False  # a large fixed capacity, mostly empty: attention over all of it
                #               would cost more than the compiled step saves
        return True

    def __call__(self, token: mx.array, layer_caches: Sequence[PreallocatedCache]) -> mx.array:
        from .. import ownership
        from ..fingerprint import check as check_fingerprint
        from ..validation import check_in_step

        # The same guards as CausalLM.__call__ with a cache: one thread per cache list, every
        # layer in step, the cache filled by this model; then the position check.
        record = ownership.claim(layer_caches, "model forward")
        try:
            offset = check_in_step(layer_caches)
            check_fingerprint(layer_caches, self.model)
            self.model.positional.check_positions(offset, 1)  # e.g. past a learned position table
            return self._run(token, layer_caches, offset)
        finally:
            ownership.release(record)

    def _run(self, token: mx.array, layer_caches: Sequence[PreallocatedCache], offset: int) -> mx.array:
        buffers = [a for cache in layer_caches for a in (cache.keys, cache.values)]
        out = self._step(token.reshape(1, 1), mx.array([offset], dtype=mx.int32), *buffers)
        del buffers  # only the graph holds the old buffers now, so the update can be in place
        for i, cache in enumerate(layer_caches):
            cache.keys, cache.values = out[1 + 2 * i], out[2 + 2 * i]
            cache.offset += 1
            cache._fetched = None  # what attention read is the whole buffer, not offset keys
        return out[0]
