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
    _select_rows(index)     keep only rows `index` (int32 [B']) of every stored array
    _prepare_rows(padding)  get ready for rows left-padded by `padding` (rarely needed)
    _extend_rows(other, width, padding)  append `other`'s rows, both left-padded to `width`
    _drop_front(n)          forget the first n slots of every row (padding all rows share)

and declares, once, at registration (`@caches.register(name, reference=..., examples=...,
exact=...)`, see caches/registry.py) what the conformance kit needs: its reference (what the
uncached oracle must do to match it), the option sets worth testing, and when it is exact
against the true model. Options are the keyword arguments of `__init__`, each kept as an
attribute of the same name (that is how `meta_state` saves them).

Rows (ragged batches). A cache holds B rows. Prompts of different lengths are left-padded to
one length: `prepare_rows(padding)` on an empty cache says that the first `padding[b]` slots of
row b are padding. The cache stores the padded sequence exactly as it stores one sequence
(`offset` counts slots, padding included); the base class turns the positions a strategy
reports (slot positions of the padded sequence) into each row's own, `slot - padding[b]`, so
padding has negative positions, which attention never reads (`caches.attention.visibility`).
The model computes each row's query positions the same way at its top. A strategy that
stores by slot needs nothing more; one whose storage depends on positions (the rotating
cache's sinks) adapts in `_prepare_rows`. Whether a cache can serve ragged batches is declared
at registration (`ragged=True`); a cache that does not declare it is refused with the reason.
`select_rows` drops rows (finished generations) where the strategy implements `_select_rows`.
"""

from __future__ import annotations

import inspect
import json
import weakref
from typing import Any, NamedTuple, Optional, Sequence

import mlx.core as mx

from .attention import Bias, fast_sdpa, scaled_dot_product_attention, visibility
from .reference import EXACT, Reference


class Unsupported(ValueError):
    """A cache that cannot serve a model by design (the message says why): raised by
    `check_model`, so `caches.make` refuses, and the property test, `kvzoo check` and `kvzoo bench`
    report the pairing as not run instead of failing (say, `streaming` on learned positions)."""


class Fetched(NamedTuple):
    """What `_append` returns when attention does not read positions 0..offset-1 in order."""

    keys: Any  # [B, Hkv, S, D] (or a strategy's own form, e.g. quantized triples)
    values: Any
    # int32 [S] (or [B, S]): absolute position of each key; None: 0..S-1 in order. May be a
    # zero-argument function returning them, called only when attention needs positions.
    positions: Any = None
    causal: bool = False  # True: plain causal visibility over these keys equals the reference's


# The shared row mask of the forward running now (Cache.rows_visibility): (a weak reference to
# its q_positions, (offset, padding), key positions, visibility). One entry: the layers of one
# forward run one after another. Dropped when that forward's q_positions array is freed, so
# the mask [B, L, S] lives no longer than the positions it was built for.
_ROWS_MASK: list = [None]


def _forget_rows_mask(ref: weakref.ref) -> None:
    entry = _ROWS_MASK[0]
    if entry is not None and entry[0] is ref:
        _ROWS_MASK[0] = None


class Cache:
    """Base class of all KV caches. A strategy implements `_append` and `state` (and, where it
    can, `_restore`, `_trim`, `_positions`, `_check`); everything else is here."""

    name: str = ""  # set by caches.register
    # True: the model hands `attend` keys and queries before RoPE, with `rotate=` the scheme's
    # rotation (x, contiguous positions) -> x, and the cache places them itself (StreamingLLM).
    rotates_keys: bool = False
    conformance: Any = None  # set by caches.register: what the conformance kit checks (registry.Conformance)
    # The fingerprint of the model whose keys/values this cache holds (set by the model's
    # forward, zoo/fingerprint.py; saved by caches.save, restored by caches.load), or None.
    model_fingerprint: Optional[str] = None
    _model_ref: Any = None  # a weak reference to that model (the cheap identity check)

    def __init__(self) -> None:
        self.offset = 0  # tokens written so far = absolute position of the next token
        self._layout: Optional[tuple] = None  # (B, Hkv, Dk, Dv, dtype) once the first update lands
        self._fetched: Optional[Fetched] = None  # what the last update returned
        self.padding: Optional[mx.array] = None  # int32 [B]: left padding of each row; None: none
        self.row_padding: Optional[tuple[int, ...]] = None  # the same, as Python ints

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

    def _select_rows(self, index: mx.array) -> None:
        """Keep only rows `index` (int32 [B'], distinct, in that order) of every stored array."""
        raise NotImplementedError

    def _prepare_rows(self, padding: tuple[int, ...]) -> None:
        """Called on an empty cache before rows left-padded by `padding` arrive; a strategy
        whose storage depends on positions adapts here (by default nothing to do)."""

    def _extend_rows(self, other: "Cache", width: int, padding: tuple[int, ...]) -> None:
        """Append the rows of `other` (same class and options): both sides' stored slots left-
        padded to `width` slots; `padding` is every row's left padding afterwards."""
        raise NotImplementedError

    def _drop_front(self, n: int) -> None:
        """Forget the first `n` slots of every row (all padding, after rows left): in-order
        storage only. Without it the shared padding stays (hidden, but attended over)."""
        raise NotImplementedError

    def _slice_front(self, n: int, *names: str) -> None:
        """`_drop_front` for in-order storage in attributes `names` ([B, H, S, *] arrays, or
        lists/tuples of them)."""
        for name in names:
            held = getattr(self, name)
            if isinstance(held, mx.array):
                setattr(self, name, held[:, :, n:])
            elif isinstance(held, (list, tuple)):
                setattr(self, name, type(held)(a[:, :, n:] for a in held))

    def _stack_rows(self, other: "Cache", width: int, *names: str) -> None:
        """`_extend_rows` for in-order storage in attributes `names` ([B, H, S, *] arrays, or
        lists/tuples of them): each side's first `offset` slots, zero slots in front up to
        `width`, then the rows of `other` after this cache's."""
        def fit(a: mx.array, offset: int) -> mx.array:
            a = a[:, :, :offset]
            if offset < width:
                a = mx.concatenate([mx.zeros((*a.shape[:2], width - offset, *a.shape[3:]), a.dtype), a], axis=2)
            return a

        for name in names:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, mx.array):
                setattr(self, name, mx.concatenate([fit(mine, self.offset), fit(theirs, other.offset)], axis=0))
            else:
                setattr(self, name, type(mine)(mx.concatenate([fit(a, self.offset), fit(b, other.offset)], axis=0)
                                               for a, b in zip(mine, theirs)))

    def _take_rows(self, index: mx.array, *names: str) -> None:
        """`_select_rows` for arrays kept in attributes `names` (an array, a list/tuple of
        arrays, or None each)."""
        for name in names:
            held = getattr(self, name)
            if isinstance(held, mx.array):
                setattr(self, name, held[index])
            elif isinstance(held, (list, tuple)):
                setattr(self, name, type(held)(a[index] for a in held))

    def check_model(self, model: Any) -> None:
        """Raise if this cache (with its options) cannot serve `model` (called by caches.make)."""

    def join(self, layers: list["Cache"]) -> None:
        """Called by caches.make (and caches.load) with the model's whole list of caches, in
        layer order: for a cache whose reference covers every layer (eviction records)."""

    # The processes holding this layer's other heads when the model is split by heads
    # (zoo.shard sets model.heads_group; caches.make hands it on); None in one process.
    heads_group: Any = None

    def across_heads(self, x: mx.array) -> mx.array:
        """`x`, summed over the heads this process holds, summed over every head of the layer.

        A cache whose choices combine heads (an eviction score summed over every head, as H2O
        and SnapKV with per_head=False keep one set of keys per layer) sums through this, so that split over
        processes by heads every process chooses what one process would. Identity when the
        model is whole."""
        group = self.heads_group
        if group is None:
            return x
        if isinstance(group, mx.distributed.Group):
            return mx.distributed.all_sum(x, group=group)
        return group.all_sum(x)  # a stand-in group (zoo.distributed.GroupLike)

    # Split by heads with the key/value heads copied (zoo.shard with more processes than kv
    # heads): (start, stop, total) of the model's kv heads this process holds a copy of, each
    # read by only some of its query heads here; None when whole or when kv heads are split.
    kv_copies: Optional[tuple[int, int, int]] = None

    def across_kv_copies(self, x: mx.array) -> mx.array:
        """`x` [B, Hkv, ...], one entry per kv head this process holds, summed over the processes
        that hold the same kv heads: a score per kv head summed over all of its query heads
        (per-head eviction), whether those live in this process or not. Identity when whole or
        when kv heads are split (a kv head's query heads are then all here)."""
        if self.heads_group is None or self.kv_copies is None:
            return x
        start, stop, total = self.kv_copies
        every = mx.zeros((x.shape[0], total, *x.shape[2:]), dtype=x.dtype)
        every[:, start:stop] = x  # the model's kv heads, zero where another process holds them
        return self.across_heads(every)[:, start:stop]

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
        """Absolute position (int32) of every stored key, in stored order: [S], or [B, S] for
        left-padded rows (each row's own positions; padding negative)."""
        return self._row_positions(self._positions())

    def fetched_positions(self) -> mx.array:
        """Absolute position of every key the last `update_and_fetch` returned, same order
        ([S], or [B, S] for left-padded rows)."""
        if self._fetched is None:
            return self.key_positions()
        positions = self._fetched.positions
        if callable(positions):
            positions = positions()
        return self._row_positions(positions)

    def _row_positions(self, positions: Optional[mx.array]) -> mx.array:
        """Slot positions of the (padded) sequence -> each row's own positions."""
        if positions is None:
            positions = mx.arange(self.offset, dtype=mx.int32)
        if self.padding is None:
            return positions
        return positions - self.padding[:, None]  # [B, S]: negative where a row is padding

    # -- rows ------------------------------------------------------------------------------

    @property
    def rows(self) -> Optional[int]:
        """How many rows (B) the cache holds; None before the first update (unless prepared)."""
        if self._layout is not None:
            return self._layout[0]
        return None if self.row_padding is None else len(self.row_padding)

    def prepare_rows(self, padding: Sequence[int]) -> None:
        """Declare B rows whose first `padding[b]` slots will be left padding (before anything
        is stored). All zeros (prompts of one length) needs nothing of the strategy; any other
        padding needs a cache registered with `ragged=True`, else ValueError with the reason."""
        padding = tuple(padding)
        if not padding or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding):
            raise ValueError(f"padding must be a non-empty sequence of ints >= 0 (one per row), got {padding!r}")
        if self.offset or self._layout is not None:
            raise ValueError(f"{type(self).__name__} already holds {self.offset} tokens: rows are "
                             f"prepared on an empty cache")
        if not any(padding):
            self.padding = self.row_padding = None
            return
        refusal = ragged_refusal(type(self))
        if refusal:
            raise ValueError(refusal)
        self._prepare_rows(padding)
        self.row_padding = padding
        self.padding = mx.array(padding, dtype=mx.int32)

    def extend_rows(self, other: "Cache") -> None:
        """Append the rows of `other` (a cache of the same class and options holding other
        prompts, e.g. just prefilled) after this cache's rows: continuous batching. The side
        with fewer slots gets left padding in front, so every row keeps its own positions.
        Raises NotImplementedError for a strategy without `_extend_rows`, ValueError for a
        cache that does not match (nothing changes then)."""
        if type(other) is not type(self) or other.options() != self.options():
            raise ValueError(f"extend_rows needs a {type(self).__name__} with options {self.options()}, "
                             f"got {type(other).__name__}")
        if self._layout is None or other._layout is None:
            raise ValueError("extend_rows joins caches that both hold tokens")
        if self._layout[1:] != other._layout[1:]:
            raise ValueError(f"extend_rows: layouts differ beyond the row count: {self._layout} and {other._layout}")
        if type(self)._extend_rows is Cache._extend_rows:
            raise NotImplementedError(f"{type(self).__name__} cannot take rows into a running batch (no _extend_rows)")
        width = max(self.offset, other.offset)
        mine = self.row_padding or (0,) * self._layout[0]
        theirs = other.row_padding or (0,) * other._layout[0]
        padding = tuple(p + width - self.offset for p in mine) + tuple(p + width - other.offset for p in theirs)
        if any(padding) and ragged_refusal(type(self)):
            raise ValueError(ragged_refusal(type(self)))
        self._extend_rows(other, width, padding)
        self.offset = width
        self._layout = (len(padding), *self._layout[1:])
        self.row_padding = padding if any(padding) else None
        self.padding = mx.array(padding, dtype=mx.int32) if any(padding) else None
        self._fetched = None

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices, in the order given): finished generations leave the batch
        and stop costing work. Raises NotImplementedError for a strategy without `_select_rows`."""
        held = self.rows
        rows = list(rows)
        if held is None:
            raise ValueError("select_rows needs a cache that holds rows (nothing stored yet)")
        if not rows or len(set(rows)) != len(rows) or not all(
                isinstance(r, int) and not isinstance(r, bool) and 0 <= r < held for r in rows):
            raise ValueError(f"rows must be distinct ints in [0, {held}), at least one; got {rows!r}")
        if type(self)._select_rows is Cache._select_rows:
            raise NotImplementedError(f"{type(self).__name__} cannot drop rows (no _select_rows)")
        if rows == list(range(held)):
            return
        if self._layout is not None:
            self._select_rows(mx.array(rows, dtype=mx.int32))
            self._layout = (len(rows), *self._layout[1:])
        if self.row_padding is not None:
            padding = tuple(self.row_padding[r] for r in rows)
            shared = min(padding)  # slots that are padding in every row left: free them
            if shared and self._layout is not None and type(self)._drop_front is not Cache._drop_front:
                self._drop_front(shared)
                self.offset -= shared
                padding = tuple(p - shared for p in padding)
            self.row_padding = padding if any(padding) else None
            self.padding = mx.array(padding, dtype=mx.int32) if any(padding) else None
        self._fetched = None

    @property
    def keys_in_order(self) -> bool:
        """True when the last fetch returned exactly positions 0..offset-1, in order (never for
        left-padded rows: their positions are their own, padding negative)."""
        return self.padding is None and (self._fetched is None or self._fetched.positions is None)

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
        if self.padding is not None:
            # Ragged rows: each row's own positions, padding hidden, and always the reference's
            # mask (`causal` promises plain causal visibility of the padded sequence, which a
            # strategy grown for the padding, like rotating's extra slots, no longer keeps).
            k_positions, visible = self.rows_visibility(q_positions)
            return scaled_dot_product_attention(
                queries, keys, values, scale=scale, q_positions=q_positions,
                k_positions=k_positions, reference=self.reference, bias=bias, visible=visible)
        if fetched.causal and bias is None and queries.shape[2] == 1:
            return fast_sdpa(queries, keys, values, scale=scale)  # one query sees every key
        positions = fetched.positions() if callable(fetched.positions) else fetched.positions
        return scaled_dot_product_attention(
            queries, keys, values, scale=scale, q_positions=q_positions, k_positions=positions,
            reference=EXACT if fetched.causal else self.reference, bias=bias,
        )

    def rows_visibility(self, q_positions: mx.array) -> tuple[mx.array, mx.array]:
        """For left-padded rows, after an update: the positions of the keys it fetched [B, S]
        and the visibility of queries at `q_positions` [B, Lq] over them ([B, Lq, S], from
        `caches.attention.visibility`).

        Built once per forward, not once per layer: every layer whose fetch was slots
        0..offset-1 in order, under a causal reference, holds the same key positions (slot -
        padding), so the first such layer builds them and the mask, and the others reuse
        both. The memo is keyed by the forward's own `q_positions` array (made once at the
        model top; the memo holds it weakly and forgets the mask when it goes), the offset
        and the padding: a new forward, or other rows, build afresh. A cache whose keys are not in
        order, or whose reference masks otherwise (a window), builds its own."""
        fetched = self._fetched
        shared = fetched is not None and fetched.positions is None and self.reference.causal
        key = (self.offset, self.row_padding)
        if shared:
            last = _ROWS_MASK[0]
            if last is not None and last[0]() is q_positions and last[1] == key:
                return last[2], last[3]
        k_positions = self.fetched_positions()
        visible = visibility(self.reference, q_positions, k_positions)
        if shared:
            _ROWS_MASK[0] = (weakref.ref(q_positions, _forget_rows_mask), key, k_positions, visible)
        return k_positions, visible

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
        if self.row_padding is not None:
            meta["padding"] = json.dumps(list(self.row_padding))
        if self._layout is not None:
            B, H, Dk, Dv, dtype = self._layout
            meta["layout"] = json.dumps([B, H, Dk, Dv, str(dtype).removeprefix("mlx.core.")])
        return meta

    @classmethod
    def from_state(cls, state: tuple, meta_state: dict[str, str]) -> "Cache":
        """Rebuild a cache from `state` and `meta_state` so that it continues bit-exactly.

        `caches.load` calls this on the class registered under the saved name; raises
        ValueError if the arrays or strings cannot make a valid cache. Only "offset" is
        required: without "options" the cache is built with its defaults (a cache with no
        options, or mlx-lm's, need not save any), without "layout" the first update sets it.
        """
        try:
            options = json.loads(meta_state.get("options", "{}"))
            offset = int(meta_state["offset"])
            layout = json.loads(meta_state["layout"]) if "layout" in meta_state else None
            padding = json.loads(meta_state["padding"]) if "padding" in meta_state else None
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"corrupt {cls.__name__} metadata: {error}") from None
        if not isinstance(options, dict) or offset < 0:
            raise ValueError(f"corrupt {cls.__name__} metadata: options {options!r}, offset {offset}")
        try:
            cache = cls(**options)
        except TypeError as error:  # an option the class does not take
            raise ValueError(f"corrupt {cls.__name__} metadata: options {options!r}: {error}") from None
        if padding is not None:
            cache.prepare_rows(padding)
        state = tuple(state)
        if not state and offset:
            raise ValueError(f"{cls.__name__} state has no arrays but offset {offset}")
        cache.offset = offset
        if layout is not None:  # before _restore, which may check its arrays against it
            B, H, Dk, Dv, dtype = layout
            cache._layout = (B, H, Dk, Dv, getattr(mx, dtype))
        if state:
            cache._restore(state)
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
        rows = self.rows
        if self._layout is None and rows is not None and keys.shape[0] != rows:
            raise ValueError(f"{type(self).__name__} was prepared for {rows} rows; got B={keys.shape[0]}")
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
        if self.padding is not None:
            raise NotImplementedError("ragged rows (left padding) serve kvzoo models, whose top "
                                      "computes each row's positions; mlx-lm models take one offset")
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


class KeyValueRows(Cache):
    """A strategy that keeps in-order keys and values in `self.keys` / `self.values` ([B, H, S, *]
    arrays, or tuples of them): the row hooks of ragged batches, written once."""

    def _select_rows(self, index):
        self._take_rows(index, "keys", "values")

    def _extend_rows(self, other, width, padding):
        self._stack_rows(other, width, "keys", "values")

    def _drop_front(self, n):
        self._slice_front(n, "keys", "values")


def ragged_refusal(cls: type) -> Optional[str]:
    """Why cache class `cls` cannot serve ragged (left-padded) rows, or None when it can (it
    was registered with `ragged=True`)."""
    declared = getattr(cls, "conformance", None)
    ragged = getattr(declared, "ragged", False)
    if ragged is True:
        return None
    name = getattr(cls, "name", "") or cls.__name__
    reason = ragged if isinstance(ragged, str) else (
        "it does not declare ragged support; a strategy whose storage follows slots can "
        "register with ragged=True (see caches/base.py, Rows)")
    return (f"cache {name!r} cannot serve a batch of prompts of different lengths: {reason}. "
            f"Use prompts of one length, batch size 1, or a cache that can "
            f"(concat, preallocated, rotating, quantized)")
