"""The KV-cache protocol every strategy implements.

One cache object serves one attention layer; a model's cache is a list of them, mutated in
place (the mlx-lm convention). The names `update_and_fetch`, `offset`, `state`, `meta_state`,
`trim`, `is_trimmable`, `nbytes` and `make_mask` match mlx-lm's, so a kvzoo cache can also be
handed to an mlx-lm model.

The contract, in one place:

- `offset` is the number of tokens written so far, which is the absolute position of the next
  token. Models derive every position from it (never from the shape of their input).
- `update_and_fetch(keys, values)` appends L tokens ([B, Hkv, L, D] each) and returns what
  attention reads: keys and values for every stored token, in the order `key_positions()`
  reports. If the update is rejected it raises before changing anything.
- `key_positions()` is the absolute position of every returned key, same order.
- `keys_in_order` is True when the returned keys are exactly positions 0..offset-1 in order;
  attention then needs no materialised mask.
- `reference` is what the uncached oracle must do to match this cache exactly.
- `attend(...)` = update, then attention under the reference's mask with the positional
  bias. A strategy that stores keys differently (quantized) overrides it; models don't change.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx

from .attention import Bias, scaled_dot_product_attention
from .reference import EXACT, Reference


class Cache:
    """Base class of all KV caches. Subclasses implement the storage methods."""

    name: str = ""  # set by caches.register
    exact: bool = True  # reproduces the true uncached model for every sequence (see exact_for)
    reference: Reference = EXACT  # a strategy with options sets its own per instance

    def __init__(self) -> None:
        self.offset = 0
        self._layout: Optional[tuple] = None  # (B, Hkv, Dk, Dv, dtype) once the first update lands

    # -- storage: every strategy implements these ------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys/values [B, Hkv, L, D]; return everything attention reads."""
        raise NotImplementedError

    def key_positions(self) -> mx.array:
        """Absolute position (int32) of every key `update_and_fetch` returned, same order."""
        return mx.arange(self.offset, dtype=mx.int32)

    def stored_kv(self) -> Optional[tuple[mx.array, mx.array]]:
        """Keys and values [B, Hkv, offset, D] as attention reads them, in position order, for
        caches whose reference rounds (the conformance kit's check of what was stored); None
        where a strategy does not provide it."""
        return None

    @property
    def keys_in_order(self) -> bool:
        """True when the fetched keys are exactly positions 0..offset-1, in order."""
        return True

    @property
    def state(self) -> tuple:
        """The arrays that make up the cache (for saving): a tuple of mx.arrays, () when empty."""
        raise NotImplementedError

    @property
    def meta_state(self) -> dict[str, str]:
        """Everything else needed to rebuild the cache (options, offset), as strings."""
        return {"offset": str(self.offset)}

    @classmethod
    def from_state(cls, state: tuple, meta_state: dict[str, str]) -> "Cache":
        """Rebuild a cache from `state` and `meta_state`, so that it continues bit-exactly.

        `caches.load` calls this on the class registered under the saved name; raise
        ValueError if the arrays or strings cannot make a valid cache.
        """
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds in memory right now."""
        return sum(a.nbytes for a in self.state if isinstance(a, mx.array))

    def is_trimmable(self) -> bool:
        """True when `trim` can remove tokens right now."""
        return False

    def trim(self, n: int) -> int:
        """Remove the last `n` tokens (at most `offset`); returns how many were removed.

        Decoding after a trim equals decoding a sequence that never had those tokens.
        """
        self._trim_count(n)
        return 0

    def _trim_count(self, n: Any) -> int:
        """Validate a trim request; the number of tokens to remove (n capped at offset)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"trim needs an int n >= 0 (tokens to remove), got {n!r}")
        if n and not self.is_trimmable():
            raise ValueError(f"{type(self).__name__} cannot be trimmed {self._why_not_trimmable()}")
        return min(n, self.offset)

    def _why_not_trimmable(self) -> str:
        return "(this strategy does not support it)"

    # -- behaviour shared by all strategies ------------------------------------------------

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
        """Store the new keys/values, then attend `queries` [B, Hq, L, D] to the cache."""
        keys, values = self.update_and_fetch(keys, values)
        k_positions = None if self.keys_in_order else self.key_positions()
        return scaled_dot_product_attention(
            queries,
            keys,
            values,
            scale=scale,
            q_positions=q_positions,
            k_positions=k_positions,
            reference=self.reference,
            bias=bias,
        )

    def empty(self) -> bool:
        return self.offset == 0

    def size(self) -> int:
        """Number of tokens attention can currently see."""
        return self.offset

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        """mlx-lm's hook: the mask for the next N queries, computed before the update."""
        if window_size is not None or not self.keys_in_order or not self.reference.causal:
            raise NotImplementedError(
                f"{type(self).__name__} builds its masks in attend(); use it with kvzoo models"
            )
        if N == 1 and not return_array:
            return None
        if not return_array:
            return "causal"
        q = mx.arange(self.offset, self.offset + N, dtype=mx.int32)
        return self.reference.mask(q, mx.arange(self.offset + N, dtype=mx.int32))

    def check_update(self, keys: Any, values: Any) -> None:
        """Raise a clear error, before anything changes, if keys/values cannot be appended."""
        for label, a in (("keys", keys), ("values", values)):
            if not isinstance(a, mx.array):
                raise TypeError(f"{label} must be an mx.array, got {type(a).__name__}")
            if a.ndim != 4:
                raise ValueError(f"{label} must be [B, n_kv_heads, L, head_dim], got shape {a.shape}")
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"keys {keys.shape} and values {values.shape} must agree on [B, n_kv_heads, L]"
            )
        if keys.shape[2] < 1:
            raise ValueError("cannot append zero tokens (L must be >= 1)")
        if keys.dtype != values.dtype:
            raise TypeError(f"keys ({keys.dtype}) and values ({values.dtype}) must share a dtype")
        layout = (keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3], keys.dtype)
        if self._layout is not None and layout != self._layout:
            B, H, Dk, Dv, dt = self._layout
            raise ValueError(
                f"{type(self).__name__} holds B={B}, n_kv_heads={H}, key dim {Dk}, value dim {Dv}, "
                f"{dt}; got B={layout[0]}, n_kv_heads={layout[1]}, key dim {layout[2]}, "
                f"value dim {layout[3]}, {layout[4]}"
            )

    def _commit_layout(self, keys: mx.array, values: mx.array) -> None:
        self._layout = (keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3], keys.dtype)

    # -- the conformance examples used by the property test and `kvzoo check` ---------------

    @classmethod
    def exact_for(cls, *, seq_len: int, **options: Any) -> bool:
        """Whether a cache built with `options` reproduces the true uncached model exactly
        over a sequence of `seq_len` tokens (not just its own reference). `kvzoo check`
        reports it; the default is the class's `exact`."""
        return cls.exact

    @classmethod
    def conformance_examples(cls, *, head_dim: int, seq_len: int) -> list[dict]:
        """Option sets worth testing for a model with this head size and a sequence this long.

        Return [] if the cache cannot serve such a model. The property test and `kvzoo check`
        draw from this list, so a newly registered cache is covered with no other edit.
        """
        return [{}]

    def check_model(self, model: Any) -> None:
        """Raise if this cache (with its options) cannot serve `model`. Called by caches.make."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(offset={self.offset})"
