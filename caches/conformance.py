"""The conformance kit: check a cache against its declared reference in one call.

    report = caches.conformance.check(model, lambda: caches.make("mine", model), prompt)
    assert report.ok, report

The model is anything callable as `model(tokens, cache)` and `model(tokens, reference=...)`
(every kvzoo model, duck-typed so this package never imports `zoo`). The kit feeds the prompt
through the cache in the given chunks, decodes greedily one token at a time, then runs the
uncached forward over the whole sequence under the cache's `Reference` and compares the logits
at every position and the greedy choice at every decode step. It also drives one layer's cache
directly (`check_storage`): the keys it returns must be the ones written at the positions it
reports, and trimmed tokens must be gone, so a cache cannot pass by luck of the model's weights.
For a cache that declares ragged rows (`register(..., ragged=True)`) it also runs a batch of
three left-padded rows of different lengths (`check_rows`): each row's logits must be that
row's uncached forward alone.

A reference that rounds (quantized) is discontinuous, so float noise between the chunked and
the uncached forward (a BLAS sums in a different order for a different number of rows) can
put a value that sits on a rounding boundary one level apart on the two sides. When such a
cache misses its oracle, the kit asks two narrower questions instead of failing: are the
cache's logits those of the uncached forward over the values it actually stored, and is every
stored value the reference's rounding of what the forward computed, up to values on a rounding
boundary (`Reference.rounding_flips`)? Both must hold; the report counts the flips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx

from .base import Cache, ragged_refusal
from .reference import StoredReference

DEFAULT_TOLERANCE = 1e-4  # fp32


@dataclass
class Report:
    """Outcome of one conformance run."""

    max_abs_diff: float  # max |cached logit - reference logit| over every position
    greedy_steps: int  # decode steps compared
    greedy_agree: int  # steps where the cache's greedy token is the reference's
    ties: int  # disagreements where the reference's top two logits are within tolerance
    bytes_per_token: float  # cache nbytes / tokens held, after the run
    true_max_abs_diff: float  # same as max_abs_diff, against the true uncached model
    true_top1_agree: float  # fraction of positions where argmax matches the true model
    tolerance: float = DEFAULT_TOLERANCE
    tokens: list[int] = field(default_factory=list)
    # When a rounding reference missed: the uncached forward over the stored values instead.
    stored_max_abs_diff: Optional[float] = None  # max |cached - that forward|
    rounding_flips: int = 0  # stored values one step off, each on a rounding boundary
    problem: Optional[str] = None  # why the stored values are not the reference's rounding
    # What `check_storage` found: the cache returning other keys than it says it returns.
    storage: list[str] = field(default_factory=list)
    # What `check_rows` found (caches that declare ragged rows): rows that differ from alone.
    rows: list[str] = field(default_factory=list)

    @property
    def exact_diff(self) -> float:
        """The difference that decides exactness: against the reference oracle, or against the
        stored-values oracle when the only departures are rounding-boundary flips."""
        if self.max_abs_diff <= self.tolerance or self.stored_max_abs_diff is None or self.problem:
            return self.max_abs_diff
        return self.stored_max_abs_diff

    @property
    def ok(self) -> bool:
        """Exact against the reference: logits within tolerance, greedy equal up to ties."""
        greedy_ok = self.greedy_agree + self.ties == self.greedy_steps
        return self.exact_diff <= self.tolerance and greedy_ok and not self.storage and not self.rows


def check(
    model: Any,
    make_cache: Callable[[], Sequence[Cache]],
    prompt: Sequence[int],
    *,
    chunks: Optional[Sequence[int]] = None,
    decode: int = 8,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Report:
    """Run `prompt` (chunked as `chunks`, default one chunk) then `decode` greedy steps."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("conformance check needs a non-empty prompt")
    chunks = list(chunks) if chunks is not None else [len(prompt)]
    if sum(chunks) != len(prompt) or any(c < 1 for c in chunks):
        raise ValueError(f"chunks {chunks} must be positive and sum to the prompt length {len(prompt)}")
    cache = list(make_cache())

    outputs, start = [], 0
    for size in chunks:
        piece = mx.array(prompt[start : start + size], dtype=mx.int32)[None]
        outputs.append(model(piece, cache)[0])  # [size, V]
        mx.eval(outputs[-1])
        start += size
    tokens = list(prompt)
    for _ in range(decode):
        tokens.append(int(mx.argmax(outputs[-1][-1]).item()))
        outputs.append(model(mx.array([tokens[-1:]], dtype=mx.int32), cache)[0])
        mx.eval(outputs[-1])
    cached = mx.concatenate(outputs, axis=0)  # [len(tokens), V]

    sequence = mx.array(tokens, dtype=mx.int32)[None]
    reference = model(sequence, reference=cache[0].reference)[0]
    true = model(sequence)[0]
    max_abs_diff = mx.abs(cached - reference).max().item()
    stored_diff, flips, problem = None, 0, None
    if max_abs_diff > tolerance and cache[0].reference.rounds:
        stored_diff, flips, problem, stored_logits = _against_stored(model, cache, sequence, cached)
        if problem is None and stored_diff <= tolerance:
            reference = stored_logits  # the greedy choices are judged against it too
    agree = ties = 0
    for step in range(decode):
        row = reference[len(prompt) - 1 + step]
        if int(mx.argmax(row).item()) == tokens[len(prompt) + step]:
            agree += 1
        else:
            top2 = mx.sort(row)[-2:]
            ties += int((top2[1] - top2[0]).item() <= tolerance)
    held = max(min(c.size() for c in cache), 1)
    config = getattr(model, "config", None)
    storage = [] if config is None else check_storage(
        lambda: make_cache()[0], head_dim=config.head_dim, n_kv_heads=config.n_kv_heads)
    return Report(
        max_abs_diff=max_abs_diff,
        greedy_steps=decode,
        greedy_agree=agree,
        ties=ties,
        bytes_per_token=sum(c.nbytes for c in cache) / held,
        true_max_abs_diff=mx.abs(cached - true).max().item(),
        true_top1_agree=(mx.argmax(cached, -1) == mx.argmax(true, -1)).mean().item(),
        tolerance=tolerance,
        tokens=tokens[len(prompt) :],
        stored_max_abs_diff=stored_diff,
        rounding_flips=flips,
        problem=problem,
        storage=storage,
        rows=check_rows(model, make_cache, [prompt, prompt[: max(1, len(prompt) // 2)], prompt[-1:]],
                        tolerance=tolerance) if ragged_refusal(type(cache[0])) is None else [],
    )


def check_rows(model: Any, make_cache: Callable[[], Sequence[Cache]], rows: Sequence[Sequence[int]], *,
               chunks: Optional[Sequence[int]] = None, decode: int = 4, pad_token: int = 0,
               tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """Feed `rows` (token lists of different lengths) left-padded as one batch through a fresh
    cache (`prepare_rows`), chunked as `chunks` (default: one chunk), then decode `decode`
    greedy tokens per row; each row's logits at every real position must be the uncached
    forward of that row alone under the cache's reference (for a rounding reference: over the
    values the cache stored for that row, up to rounding-boundary flips). Returns the problems
    ([] when every row is its own)."""
    rows = [[int(t) for t in r] for r in rows]
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    chunks = list(chunks) if chunks is not None else [width]
    cache = list(make_cache())
    for c in cache:
        c.prepare_rows(padding)
    tokens = mx.array([[pad_token] * p + r for p, r in zip(padding, rows)], dtype=mx.int32)  # [B, width]
    outputs, start = [], 0
    for size in chunks:
        outputs.append(model(tokens[:, start : start + size], cache))
        start += size
    sequences = [list(r) for r in rows]
    for _ in range(decode):
        step = mx.argmax(outputs[-1][:, -1], axis=-1).tolist()
        for r, t in zip(sequences, step):
            r.append(int(t))
        outputs.append(model(mx.array(step, dtype=mx.int32)[:, None], cache))
    cached = mx.concatenate(outputs, axis=1)  # [B, width + decode, V]
    mx.eval(cached)
    reference = cache[0].reference
    problems = []
    for b, (pad, sequence) in enumerate(zip(padding, sequences)):
        got = cached[b, pad:]
        alone = model(mx.array([sequence], dtype=mx.int32), reference=reference)[0]
        diff = mx.abs(got - alone).max().item()
        if diff > tolerance and reference.rounds and cache[0].stored_kv() is not None:
            stored = [tuple(a[b : b + 1, :, pad:] for a in c.stored_kv()) for c in cache]
            oracle = StoredReference(reference, stored)
            diff = mx.abs(got - model(mx.array([sequence], dtype=mx.int32), reference=oracle)[0]).max().item()
            if oracle.flips()[1] is not None:
                diff = float("inf")
        if diff > tolerance:
            problems.append(f"row {b} of {len(rows)} (left padding {pad}) differs from that row alone by "
                            f"{diff:.3g} (tolerance {tolerance:g})")
    return problems


def _against_stored(model, cache, sequence, cached) -> tuple[Optional[float], int, Optional[str], Any]:
    """(max |cached - uncached forward over the stored values|, rounding flips, problem, those
    logits) for a cache whose rounding reference it missed."""
    stored = [c.stored_kv() for c in cache]
    if any(kv is None for kv in stored):
        return None, 0, f"{type(cache[0]).__name__} does not expose stored_kv(), so the miss cannot be explained", None
    oracle = StoredReference(cache[0].reference, stored)
    logits = model(sequence, reference=oracle)[0]
    flips, problem = oracle.flips()
    return mx.abs(cached - logits).max().item(), flips, problem, logits


# -- what a cache returns, checked against what it says --------------------------------------


def check_storage(
    make_cache: Callable[[], Any],
    *,
    chunks: Sequence[int] = (5, 1, 1, 7, 1, 3, 1, 1),
    trims: Optional[dict[int, int]] = None,
    head_dim: int = 16,
    n_kv_heads: int = 2,
    seed: int = 0,
) -> list[str]:
    """Drive one layer's cache directly with random keys and values (distinct at every position)
    and check, after every update, that what it returns is what it says it returns: the keys and
    values attention reads are the ones written at the positions the cache reports (under its
    reference's `transform_kv`), those positions are distinct and already written, `size()`
    counts what it stores, and after `trim` the trimmed tokens are gone (rewriting those
    positions returns the new keys, never the old ones).

    `make_cache()` returns a Cache (or a list; the first is used); `trims` maps an update index
    to a number of tokens to trim after it (default: one trim of 2 in the middle, where the
    cache allows it). Returns the problems found ([] when the cache tells the truth).
    """
    cache = make_cache()
    if isinstance(cache, (list, tuple)):
        cache = cache[0]
    trims = {len(chunks) // 2: 2} if trims is None else dict(trims)
    key = mx.random.key(seed)
    truth_k: list[mx.array] = []  # [1, H, 1, D] per position: what was written there last
    truth_v: list[mx.array] = []
    problems: list[str] = []
    for step, length in enumerate(chunks):
        key, k1, k2 = mx.random.split(key, 3)
        keys = mx.random.normal((1, n_kv_heads, length, head_dim), key=k1)
        values = mx.random.normal((1, n_kv_heads, length, head_dim), key=k2)
        fetched_k, fetched_v = cache.update_and_fetch(keys, values)
        truth_k += [keys[:, :, i : i + 1] for i in range(length)]
        truth_v += [values[:, :, i : i + 1] for i in range(length)]
        where = f"update {step} ({length} tokens, offset {cache.offset})"
        if cache.offset != len(truth_k):
            problems.append(f"{where}: offset is {cache.offset}, {len(truth_k)} tokens were written")
            break
        problems += _compare_fetch(cache, fetched_k, fetched_v, truth_k, truth_v, where)
        held = cache.key_positions()  # [S], or [B, Hkv, S]: every row and kv head its own
        for stored in held.reshape(-1, held.shape[-1]).tolist():
            if len(set(stored)) != len(stored) or any(not 0 <= p < cache.offset for p in stored):
                problems.append(f"{where}: key_positions() {stored} are not distinct positions below the offset")
            if cache.size() != len(stored):
                problems.append(f"{where}: size() is {cache.size()} but key_positions() lists {len(stored)}")
        n = trims.get(step, 0)
        if n and cache.is_trimmable():
            removed = cache.trim(n)
            del truth_k[len(truth_k) - removed:], truth_v[len(truth_v) - removed:]
            if cache.offset != len(truth_k):
                problems.append(f"{where}: trim({n}) left offset {cache.offset}, expected {len(truth_k)}")
                break
        if problems:
            break
    return problems


def _compare_fetch(cache, fetched_k, fetched_v, truth_k, truth_v, where: str) -> list[str]:
    fetched = cache.fetched_positions()
    if fetched.ndim == 3:  # [B, Hkv, S]: keys that differ per kv head (per-head eviction)
        problems = []
        for h in range(fetched.shape[1]):
            problems += _compare_fetch(_OneHead(cache, fetched[:, h]), fetched_k[:, h : h + 1],
                                       fetched_v[:, h : h + 1], [t[:, h : h + 1] for t in truth_k],
                                       [t[:, h : h + 1] for t in truth_v], f"{where}, kv head {h}")
        return problems
    positions = [int(p) for p in fetched.reshape(-1).tolist()]
    if len(set(positions)) != len(positions) or any(not 0 <= p < len(truth_k) for p in positions):
        return [f"{where}: the fetched key positions {positions} are not distinct written positions"]
    reference = cache.reference
    if isinstance(fetched_k, mx.array):
        got = (fetched_k, fetched_v)
    else:  # stored in another form (quantized): check what it reports it stored, in order
        got = cache.stored_kv()
        if got is None or got[0].shape[2] != len(truth_k):
            return []
        positions = list(range(len(truth_k)))
    if got[0].shape[2] != len(positions):
        return [f"{where}: returned {got[0].shape[2]} keys but reports {len(positions)} positions"]
    written = (mx.concatenate([truth_k[p] for p in positions], axis=2),
               mx.concatenate([truth_v[p] for p in positions], axis=2))
    want = reference.transform_kv(*written)
    if all(mx.array_equal(a.astype(mx.float32), b.astype(mx.float32)).item() for a, b in zip(got, want)):
        return []
    if reference.rounds and reference.rounding_flips(written, got)[1] is None:
        return []
    return [f"{where}: the keys/values returned are not the ones written at the positions it reports "
            f"({positions[:8]}{'...' if len(positions) > 8 else ''})"]


class _OneHead:
    """One kv head of a cache whose key positions differ per head, as `_compare_fetch` reads a
    cache: its fetched positions and its reference."""

    def __init__(self, cache: Any, positions: mx.array) -> None:
        self.reference, self._positions = cache.reference, positions[0]

    def fetched_positions(self) -> mx.array:
        return self._positions
