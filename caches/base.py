"""The KV-cache protocol: the base class does the bookkeeping, a strategy fills storage hooks.

One cache object serves one attention layer; a model's cache is a list of them, mutated in
place (the mlx-lm convention). The public face keeps mlx-lm's names (`update_and_fetch`,
`offset`, `state`, `meta_state`, `trim`, `is_trimmable`, `nbytes`, `make_mask`), so a kvzoo
cache can also be handed to an mlx-lm model.

What the base class owns (template method): validating every update (types, shapes, the layout
fixed by the first update), the atomic commit (`offset` advances only after the strategy stored
the tokens; a refused update changes nothing), trim's argument checks, attention over what was
fetched (mask, positional bias, MLX's fast paths), save/load of options and offset, and
mlx-lm's `make_mask`.

What a strategy implements (see docs/architecture.md, "Adding a cache"):

    _append(keys, values)   store L tokens [B, Hkv, L, D] at positions offset..offset+L-1
                            (self.offset still counts the tokens before them); return what
                            attention reads now: (keys, values) for positions 0..offset+L-1 in
                            order, or Fetched(keys, values, positions, causal) when not.
    state                   the arrays that make up the cache (a property; () when empty)
    _restore(state)         the inverse of `state` on a fresh cache (for caches.load)
    _trim(n)                drop the newest n tokens (only if the strategy can)
    _positions()            absolute positions of the stored keys, if not 0..offset-1 in order
    _check(keys, values)    strategy-specific refusals, raised before anything changes

and declares, once, at registration (`@caches.register(name, reference=..., examples=...,
exact=...)`, see caches/registry.py) what the conformance kit needs: its reference (what the
uncached oracle must do to match it), the option sets worth testing, and when it is exact
against the true model. Options are the keyword arguments of `__init__`, each kept as an
attribute of the same name (that is how `meta_state` saves them).
"""

from __future__ import annotations

import inspect
import json
from typing import Any, NamedTuple, Optional

import mlx.core as mx

from .attention import Bias, fast_sdpa, scaled_dot_product_attention
from .reference import EXACT, Reference


class Fetched(NamedTuple):
    """What `_append` returns when attention does not read positions 0..offset-1 in order."""

    keys: Any  # [B, Hkv, S, D] (or a strategy's own form, e.g. quantized triples)
    values: Any
    # int32 [S] (or [B, S]): absolute position of each key; None: 0..S-1 in order. May be a
    # zero-argument function returning them, called only when attention needs positions.
    positions: Any = None
    causal: bool = False  # True: plain causal visibility over these keys equals the reference's


class Cache:
    """Base class of all KV caches. A strategy implements `_append` and `state` (and, where it
    can, `_restore`, `_trim`, `_positions`, `_check`); everything else is here."""

    name: str = ""  # set by caches.register
    conformance: Any = None  # set by caches.register: what the conformance kit checks (registry.Conformance)
    # The fingerprint of the model whose keys/values this cache holds (set by the model's
    # forward, zoo/fingerprint.py; saved by caches.save, restored by caches.load), or None.
    model_fingerprint: Optional[str] = None
    _model_ref: Any = None  # a weak reference to that model (the cheap identity check)

    def __init__(self) -> None:
        self.offset = 0  # tokens written so far = absolute position of the next token
        self._layout: Optional[tuple] = None  # (B, Hkv, Dk, Dv, dtype) once the first update lands
        self._fetched: Optional[Fetched] = None  # what the last update returned

    # -- storage hooks: what a strategy implements -----------------------------------------

    def _append(self, keys: mx.array, values: mx.array) -> Any:
        """Store keys/values [B, Hkv, L, D]; return (keys, values) or a `Fetched`."""
        raise NotImplementedError(f"{type(self).__name__} must implement _append(keys, values)")

    @property
    def state(self) -> tuple:
        """The arrays that make up the cache (for saving): a tuple of mx.arrays, () when empty."""
        raise NotImplementedError(f"{type(self).__name__} does not define `state`, so it cannot be saved")

    def _restore(self, state: tuple) -> None:
        """Set up a fresh cache (built with the saved options, `offset` already restored) from
        `state`; raise ValueError if the arrays cannot be that."""
        raise NotImplementedError(f"{type(self).__name__} does not define _restore, so it cannot be loaded")

    def _trim(self, n: int) -> None:
        """Forget the newest `n` stored tokens (1 <= n <= offset; offset is moved afterwards)."""
        raise NotImplementedError

    def _positions(self) -> Optional[mx.array]:
        """Absolute positions (int32) of the stored keys, in stored order; None when they are
        exactly 0..offset-1 in order."""
        return None

    def _check(self, keys: mx.array, values: mx.array) -> None:
        """Raise ValueError/TypeError if this strategy cannot store keys/values (e.g. a full
        buffer). Called after the generic checks, before anything changes."""

    def check_model(self, model: Any) -> None:
        """Raise if this cache (with its options) cannot serve `model` (called by caches.make)."""

    def _trim_refusal(self) -> Optional[str]:
        """Why `trim` cannot remove tokens right now, or None when it can."""
        if type(self)._trim is Cache._trim:
            return "(this strategy does not support it)"
        return None

    # -- the public face -------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Append keys/values [B, Hkv, L, D]; return everything attention reads now.

        A refused update (bad shapes, dtypes, a full buffer) raises before changing anything.
        """
        self.check_update(keys, values)
        saved = dict(self.__dict__)
        try:
            fetched = self._append(keys, values)
        except BaseException:
            self.__dict__.clear()  # attributes the strategy rebound go back (see _check for
            self.__dict__.update(saved)  # refusals: they must come before in-place writes)
            raise
        if not isinstance(fetched, Fetched):
            fetched = Fetched(*fetched)
        self._layout = (keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3], keys.dtype)
        self.offset += keys.shape[2]
        self._fetched = fetched
        return fetched.keys, fetched.values

    def key_positions(self) -> mx.array:
        """Absolute position (int32) of every stored key, in stored order."""
        positions = self._positions()
        return mx.arange(self.offset, dtype=mx.int32) if positions is None else positions

    def fetched_positions(self) -> mx.array:
        """Absolute position of every key the last `update_and_fetch` returned, same order."""
        if self._fetched is None:
            return self.key_positions()
        positions = self._fetched.positions
        if callable(positions):
            positions = positions()
        return mx.arange(self.offset, dtype=mx.int32) if positions is None else positions

    @property
    def keys_in_order(self) -> bool:
        """True when the last fetch returned exactly positions 0..offset-1, in order."""
        return self._fetched is None or self._fetched.positions is None

    @property
    def reference(self) -> Reference:
        """What the uncached oracle must do to reproduce this cache (declared at registration)."""
        reference = self.__dict__.get("_reference")
        if reference is None:
            declared = type(self).conformance
            reference = EXACT if declared is None else declared.reference(self)
            self._reference = reference
        return reference

    @reference.setter
    def reference(self, value: Reference) -> None:
        self._reference = value

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
        """Store the new keys/values, then attend `queries` [B, Hq, L, D] to what the cache
        returns, under its reference's mask plus the positional bias."""
        keys, values = self.update_and_fetch(keys, values)
        fetched = self._fetched
        if fetched.causal and bias is None and queries.shape[2] == 1:
            return fast_sdpa(queries, keys, values, scale=scale)  # one query sees every key
        positions = fetched.positions() if callable(fetched.positions) else fetched.positions
        return scaled_dot_product_attention(
            queries, keys, values, scale=scale, q_positions=q_positions, k_positions=positions,
            reference=EXACT if fetched.causal else self.reference, bias=bias,
        )

    def stored_kv(self) -> Optional[tuple[mx.array, mx.array]]:
        """Keys and values [B, Hkv, offset, D] as attention reads them, in position order: what
        the conformance kit compares with a rounding reference. By default the last fetch, when
        it returned plain arrays for positions 0..offset-1; None otherwise (a strategy that
        stores keys in another form, like `quantized`, overrides this)."""
        fetched = self._fetched
        if fetched is None or fetched.positions is not None or not isinstance(fetched.keys, mx.array):
            return None
        if fetched.keys.shape[2] != self.offset:
            return None
        return fetched.keys, fetched.values

    def size(self) -> int:
        """Number of tokens attention can currently see."""
        positions = self._positions()
        return self.offset if positions is None else positions.shape[-1]

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds in memory right now."""
        return sum(a.nbytes for a in self.state if isinstance(a, mx.array))

    # -- trim ------------------------------------------------------------------------------

    def is_trimmable(self) -> bool:
        """True when `trim` can remove tokens right now."""
        return self._trim_refusal() is None

    def trim_horizon(self) -> Optional[int]:
        """The largest offset up to which `trim` stays possible (None: at any offset). What
        speculative decoding checks before it starts. A strategy whose trimming depends on its
        state (`_trim_refusal`) overrides this; by default such a cache promises nothing beyond
        its present offset."""
        if type(self)._trim is Cache._trim:
            return 0
        if type(self)._trim_refusal is Cache._trim_refusal:
            return None
        return self.offset if self.is_trimmable() else 0

    def trim(self, n: int) -> int:
        """Remove the last `n` tokens (at most `offset`); returns how many were removed.

        Decoding after a trim equals decoding a sequence that never had those tokens.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"trim needs an int n >= 0 (tokens to remove), got {n!r}")
        n = min(n, self.offset)
        if n == 0:
            return 0
        refusal = self._trim_refusal()
        if refusal is not None:
            raise ValueError(f"{type(self).__name__} cannot be trimmed {refusal}")
        self._trim(n)
        self.offset -= n
        self._fetched = None
        return n

    # -- save and load ---------------------------------------------------------------------

    def can_save(self) -> bool:
        """True when the strategy defines what saving and loading need (`state`, `_restore`)."""
        cls = type(self)
        restores = cls._restore is not Cache._restore or cls.from_state.__func__ is not Cache.from_state.__func__
        return cls.state is not Cache.state and restores

    def options(self) -> dict[str, Any]:
        """The options this cache was built with (its `__init__` keyword arguments)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        missing = [p for p in names if not hasattr(self, p)]
        if missing:
            raise ValueError(
                f"{type(self).__name__} does not keep its option(s) {missing} as attributes of "
                f"the same name, so they cannot be saved; store them or override meta_state/from_state")
        return {p: getattr(self, p) for p in names}

    @property
    def meta_state(self) -> dict[str, str]:
        """Everything but the arrays needed to rebuild the cache, as strings: offset, options
        (JSON) and the layout of its keys and values."""
        try:
            options = json.dumps(self.options())
        except TypeError as error:
            raise ValueError(f"{type(self).__name__} options cannot be saved as JSON: {error}") from None
        meta = {"offset": str(self.offset), "options": options}
        if self._layout is not None:
            B, H, Dk, Dv, dtype = self._layout
            meta["layout"] = json.dumps([B, H, Dk, Dv, str(dtype).removeprefix("mlx.core.")])
        return meta

    @classmethod
    def from_state(cls, state: tuple, meta_state: dict[str, str]) -> "Cache":
        """Rebuild a cache from `state` and `meta_state` so that it continues bit-exactly.

        `caches.load` calls this on the class registered under the saved name; raises
        ValueError if the arrays or strings cannot make a valid cache.
        """
        try:
            options = json.loads(meta_state.get("options", "{}"))
            offset = int(meta_state["offset"])
            layout = json.loads(meta_state["layout"]) if "layout" in meta_state else None
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"corrupt {cls.__name__} metadata: {error}") from None
        if not isinstance(options, dict) or offset < 0:
            raise ValueError(f"corrupt {cls.__name__} metadata: options {options!r}, offset {offset}")
        cache = cls(**options)
        state = tuple(state)
        if not state and offset:
            raise ValueError(f"{cls.__name__} state has no arrays but offset {offset}")
        cache.offset = offset
        if state:
            cache._restore(state)
        if layout is not None:
            B, H, Dk, Dv, dtype = layout
            cache._layout = (B, H, Dk, Dv, getattr(mx, dtype))
        return cache

    # -- validation ------------------------------------------------------------------------

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
        self._check(keys, values)

    # -- mlx-lm models ---------------------------------------------------------------------

    def _upcoming(self, n: int) -> tuple[Optional[mx.array], bool]:
        """(positions, causal) of what the next update of `n` tokens will fetch, as `_append`
        will return them; predicted before the update, for mlx-lm's `make_mask`."""
        if type(self)._positions is Cache._positions:
            return None, False
        raise NotImplementedError(
            f"{type(self).__name__} cannot say before an update which keys it will return, so it "
            f"cannot build masks for mlx-lm models; use it with kvzoo models")

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        """mlx-lm's hook: the mask for the next N queries, computed before the update."""
        positions, causal = self._upcoming(N)
        reference = EXACT if causal else self.reference
        if positions is None and reference.causal and window_size is None and not return_array:
            return None if N == 1 else "causal"
        q = mx.arange(self.offset, self.offset + N, dtype=mx.int32)
        k = mx.arange(self.offset + N, dtype=mx.int32) if positions is None else positions
        mask = reference.mask(q, k)
        if window_size is not None:
            mask = mask & (k[None, :] > q[:, None] - window_size)
        return mask

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items()) if self._options_kept() else ""
        return f"{type(self).__name__}({options + ', ' if options else ''}offset={self.offset})"

    def _options_kept(self) -> bool:
        try:
            self.options()
            return True
        except ValueError:
            return False
