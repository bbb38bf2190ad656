"""Batched generation with ragged prompts: every row equals that prompt alone, for every cache.

The oracle of each row is the uncached forward of that row alone (under the cache's
reference), the same oracle tests/test_equivalence.py uses for one sequence; the batch adds
left padding, per-row positions and rows that leave the batch. Drawn: family, positional
scheme, cache (with the option sets it declares, caches.examples), head layout, batch size
1-5, ragged lengths, prefill chunking.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from helpers.equivalence import (HEAD_DIMS, LLAMA3_ROPE, TOLERANCE, chunkings, divisors,
                                 max_abs_diff, reference_logits)
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import caches
import positional
import zoo
from caches.reference import StoredReference

MAX_LEN = 16
# The caches that declare ragged rows (caches.register(..., ragged=True)); others are refused
# (tested below), so a newly registered cache joins these tests once it declares them.
RAGGED = [name for name in caches.available() if caches.ragged_refusal(caches.get(name)) is None]


def test_every_built_in_cache_serves_ragged_rows():
    assert {"concat", "preallocated", "rotating", "quantized"} <= set(RAGGED)
MAX_DECODE = 10


def padded_batch(rows: list[list[int]], pad_token: int) -> tuple[mx.array, list[int]]:
    """Rows left-padded to one length: int32 [B, width] and each row's padding."""
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    return mx.array([[pad_token] * p + r for p, r in zip(padding, rows)], dtype=mx.int32), padding


def batched_logits(model, cache, rows, chunks, pad_token=0) -> tuple[mx.array, list[int]]:
    """Logits [B, width, V] of the left-padded rows fed through `cache` chunk by chunk."""
    tokens, padding = padded_batch(rows, pad_token)
    for c in cache:
        c.prepare_rows(padding)
    out, start = [], 0
    for size in chunks:
        out.append(model(tokens[:, start : start + size], cache))
        start += size
    out = mx.concatenate(out, axis=1)
    mx.eval(out)
    return out, padding


def row_gap(model, cache, b: int, pad: int, row: list[int], got: mx.array) -> float:
    """How far row b's cached logits `got` [len(row), V] are from that row's oracle alone; for a
    rounding reference, a miss must be explained by the values the cache stored for the row."""
    reference = cache[0].reference
    raw = max_abs_diff(got, reference_logits(model, row, reference))
    if raw <= TOLERANCE or not reference.rounds:
        return raw
    stored = [tuple(a[b : b + 1, :, pad:] for a in c.stored_kv()) for c in cache]
    oracle = StoredReference(reference, stored)
    diff = max_abs_diff(got, reference_logits(model, row, oracle))
    flips, problem = oracle.flips()
    assert problem is None, f"row {b} misses the rounded oracle by {raw:.3g}: {problem}"
    return diff


def check_greedy_row(model, prompt, emitted, reference, tolerance=TOLERANCE) -> int:
    """Each emitted token is the argmax of the uncached forward of that row's prefix alone (a
    tie within tolerance may go either way); returns the ties."""
    sequence, ties = list(prompt), 0
    for token in emitted:
        logits = reference_logits(model, sequence, reference)[-1]
        choice = mx.argmax(logits).item()
        if choice != token:
            gap = abs(logits[token].item() - logits[choice].item())
            assert gap <= tolerance, f"row diverged after {len(sequence) - len(prompt)} tokens: {token} vs {choice}"
            ties += 1
        sequence.append(token)
    return ties


@st.composite
def batch_scenarios(draw):
    scheme = draw(st.sampled_from(positional.available()))
    cache_name = draw(st.sampled_from(RAGGED))
    n_heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    lengths = draw(st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=5))
    decode = draw(st.integers(0, MAX_DECODE))
    examples = caches.examples(cache_name, head_dim=head_dim, seq_len=max(lengths) + decode + 1)
    assume(examples)
    return dict(
        family=draw(st.sampled_from(zoo.available())),
        config=dict(positional=scheme, n_heads=n_heads, n_kv_heads=draw(st.sampled_from(divisors(n_heads))),
                    head_dim=head_dim, n_layers=draw(st.integers(1, 2)), d_model=32,
                    vocab_size=draw(st.integers(8, 64)), d_ff=32, max_positions=64, init_std=0.1,
                    rope_scaling=draw(st.sampled_from([None, LLAMA3_ROPE])) if scheme == "rope" else None,
                    sliding_window=draw(st.sampled_from([None, None, 3]))),
        cache=cache_name, options=draw(st.sampled_from(examples)),
        lengths=lengths, chunks=draw(chunkings(max(lengths) + decode)), decode=decode,
        prefill_step=draw(st.integers(1, 6)), seed=draw(st.integers(0, 2**16)),
    )


def run_batch_scenario(s: dict) -> list[str]:
    events = []
    model = zoo.build(s["family"], seed=s["seed"], **s["config"])
    vocab = model.config.vocab_size
    rng = random.Random(s["seed"])
    full = [[rng.randrange(vocab) for _ in range(n + s["decode"])] for n in s["lengths"]]
    width = max(len(r) for r in full)
    full_width_chunks = s["chunks"] if width == max(s["lengths"]) + s["decode"] else [width]

    # 1. Teacher-forced: every row's logits at every position, the padded batch fed in chunks.
    cache = caches.make(s["cache"], model, **s["options"])
    got, padding = batched_logits(model, cache, full, full_width_chunks, pad_token=rng.randrange(vocab))
    for b, (row, pad) in enumerate(zip(full, padding)):
        gap = row_gap(model, cache, b, pad, row, got[b, pad:])
        assert gap <= TOLERANCE, f"row {b} (padding {pad}) differs from itself alone by {gap:.3g}: {s}"

    # 2. Greedy decoding of the batch (zoo.generate_step over token lists): each row's tokens.
    if s["decode"]:
        prompts = [r[:n] for r, n in zip(full, s["lengths"])]
        steps = list(zoo.generate_step(model, prompts, cache=s["cache"], cache_options=s["options"],
                                       max_tokens=s["decode"], prefill_step=s["prefill_step"]))
        assert len(steps) == s["decode"]
        reference = cache[0].reference
        tolerance = 0.05 if reference.rounds else TOLERANCE  # a rounding flip moves logits by more
        for b, prompt in enumerate(prompts):
            emitted = [tokens[b] for tokens, _ in steps]
            if check_greedy_row(model, prompt, emitted, reference, tolerance):
                events.append("greedy tie broken the other way")
    return events


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(batch_scenarios())
def test_every_row_of_a_ragged_batch_equals_that_row_alone(s):
    for name in run_batch_scenario(s):
        event(name)


GRID = [(family, scheme, cache_name) for family in zoo.available() for scheme in positional.available()
        for cache_name in RAGGED]


@pytest.mark.parametrize("family,scheme,cache_name", GRID)
def test_grid_every_family_scheme_and_cache_batched(family, scheme, cache_name):
    """Each family x scheme x cache at least once, with every declared option set, one head
    layout each (MHA, GQA, MQA in turn), rows of lengths 14, 3, 1, 9 (wrapping at different
    times in a rotating cache, and decoding one token at a time long after the padded batch
    wrapped), chunked prefill and greedy decoding."""
    n_kv_heads = (4, 2, 1)[GRID.index((family, scheme, cache_name)) % 3]
    for options in caches.examples(cache_name, head_dim=32, seq_len=20):
        s = dict(family=family, cache=cache_name, options=options, lengths=[14, 3, 1, 9], decode=12,
                 chunks=[5, 1, 7, 6] + [1] * 7, prefill_step=4, seed=7,
                 config=dict(positional=scheme, n_heads=4, n_kv_heads=n_kv_heads, head_dim=32,
                             n_layers=2, d_model=32, vocab_size=48, d_ff=48, max_positions=64, init_std=0.1))
        run_batch_scenario(s)


# -- padding is never attended -----------------------------------------------------------

@pytest.mark.parametrize("cache_name", RAGGED)
@pytest.mark.parametrize("scheme", positional.available())
def test_padding_token_ids_change_nothing(cache_name, scheme):
    """Other ids in the padding slots: every real position's logits are bit-for-bit the same."""
    model = zoo.build("llama", seed=3, positional=scheme, n_heads=4, n_kv_heads=2, head_dim=32,
                      n_layers=2, d_model=32, vocab_size=40, d_ff=32, max_positions=64, init_std=0.5)
    rng = random.Random(1)
    rows = [[rng.randrange(40) for _ in range(n)] for n in (12, 2, 7)]
    options = caches.examples(cache_name, head_dim=32, seq_len=12)[-1]
    outs = []
    for pad_token in (0, 17, 39):
        cache = caches.make(cache_name, model, **options)
        got, padding = batched_logits(model, cache, rows, [5, 7], pad_token=pad_token)
        outs.append([got[b, p:] for b, p in enumerate(padding)])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert mx.array_equal(a, b), "a padding token id changed a real position's logits"


# -- rows leave the batch ----------------------------------------------------------------

@pytest.mark.parametrize("cache_name", RAGGED)
def test_selected_rows_continue_as_if_alone(cache_name):
    """Prefill four ragged rows, drop two (select_rows), keep decoding teacher-forced: the kept
    rows' logits still equal each row alone, the cache holds only them, and the padding every
    kept row has is freed (in-order caches)."""
    model = zoo.build("gpt2", seed=5, n_heads=4, n_kv_heads=4, head_dim=32, n_layers=2, d_model=32,
                      vocab_size=40, d_ff=32, max_positions=64, init_std=0.1, positional="alibi")
    rng = random.Random(2)
    full = [[rng.randrange(40) for _ in range(n)] for n in (10, 16, 4, 13)]
    prompts = [r[:-4] for r in full]
    options = caches.examples(cache_name, head_dim=32, seq_len=16)[-1]
    cache = caches.make(cache_name, model, **options)
    got, padding = batched_logits(model, cache, prompts, [max(len(p) for p in prompts)])
    before = sum(c.nbytes for c in cache)
    if type(cache[0])._select_rows is caches.Cache._select_rows:  # may keep finished rows
        with pytest.raises(NotImplementedError):
            cache[0].select_rows([3, 1])
        return
    width = cache[0].offset
    for c in cache:
        c.select_rows([3, 0])  # the longest row (no padding) leaves: the padding both share goes
    assert [c.rows for c in cache] == [2] * len(cache)
    shared = min(padding[3], padding[0])
    if type(cache[0])._drop_front is not caches.Cache._drop_front:
        assert cache[0].row_padding == (padding[3] - shared, padding[0] - shared)
        assert cache[0].offset == width - shared
    else:
        assert cache[0].row_padding == (padding[3], padding[0]) and cache[0].offset == width
    assert sum(c.nbytes for c in cache) < before
    rest = mx.array([full[3][-4:], full[0][-4:]], dtype=mx.int32)
    tail = mx.concatenate([model(rest[:, i : i + 1], cache) for i in range(4)], axis=1)
    for b, row in enumerate([full[3], full[0]]):
        alone = reference_logits(model, row, cache[0].reference)
        assert max_abs_diff(tail[b], alone[-4:]) <= TOLERANCE
    with pytest.raises(ValueError, match="distinct ints"):
        cache[0].select_rows([0, 0])


# -- what a cache must declare -----------------------------------------------------------

def test_a_cache_that_does_not_declare_ragged_rows_is_refused_with_the_reason():
    from helpers.user_caches import NewestFirstCache

    class UserCache(NewestFirstCache):
        pass

    try:
        caches.register("test_user_rows")(UserCache)
        model = zoo.build("llama", preset="tiny", seed=0)
        with pytest.raises(ValueError, match="test_user_rows.*does not declare ragged support"):
            list(zoo.generate_step(model, [[1, 2, 3], [4]], cache="test_user_rows", max_tokens=2))
        cache = caches.make("test_user_rows", model)
        with pytest.raises(ValueError, match="ragged"):
            cache[0].prepare_rows([0, 2])
        assert cache[0].padding is None and cache[0].rows is None  # nothing changed
        # Prompts of one length need no padding: any cache serves them, each row as alone.
        steps = list(zoo.generate_step(model, [[1, 2, 3], [4, 5, 6]], cache="test_user_rows", max_tokens=3))
        for b, prompt in enumerate([[1, 2, 3], [4, 5, 6]]):
            alone = [t for t, _ in zoo.generate_step(model, prompt, cache="test_user_rows", max_tokens=3)]
            assert [tokens[b] for tokens, _ in steps] == alone
        # Declared with a reason, the reason is what the user reads.
        caches.register("test_user_rows_why", ragged="it keeps one position counter")(type("Why", (UserCache,), {}))
        with pytest.raises(ValueError, match="it keeps one position counter"):
            caches.make("test_user_rows_why", model)[0].prepare_rows([1, 0])
    finally:
        from caches.registry import CACHES

        for name in ("test_user_rows", "test_user_rows_why"):
            if name in CACHES:
                CACHES.remove(name)


def test_bad_batches_are_refused_with_what_is_allowed():
    model = zoo.build("llama", preset="tiny", seed=0)
    with pytest.raises(ValueError, match="empty"):
        list(zoo.generate_step(model, [[1, 2], []], max_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(zoo.generate_step(model, [[1, 2], [10**6]], max_tokens=2))
    with pytest.raises(ValueError, match="speculative"):
        list(zoo.generate_step(model, [[1, 2], [3]], prompt_lookup=2, max_tokens=2))
    cache = caches.make("concat", model)
    model(mx.array([[1, 2]]), cache)
    with pytest.raises(ValueError, match="empty cache"):
        cache[0].prepare_rows([1])
    with pytest.raises(ValueError, match="empty caches"):
        list(zoo.generate_step(model, [[1, 2], [3]], cache=cache, max_tokens=2))
    fresh = caches.make("concat", model)
    with pytest.raises(ValueError, match="ints >= 0"):
        fresh[0].prepare_rows([1, -1])
    for c in fresh:
        c.prepare_rows([2, 0])
    with pytest.raises(ValueError, match="2 rows"):
        model(mx.array([[1, 2]]), fresh)


# -- the conformance kit checks rows for a cache that declares them ----------------------

def test_the_conformance_kit_checks_ragged_rows_of_a_declared_cache():
    """A user cache that declares ragged=True but stores every row at the first row's slots
    (it drops the row axis) is caught by caches.conformance.check; the built-ins pass."""
    from helpers.user_caches import NewestFirstCache

    from caches import conformance
    from caches.registry import CACHES

    class RowBlindCache(NewestFirstCache):
        def _append(self, keys, values):
            fetched = super()._append(keys, values)
            k, v = fetched.keys[:1], fetched.values[:1]  # every row reads row 0's keys
            return caches.Fetched(mx.broadcast_to(k, fetched.keys.shape), mx.broadcast_to(v, fetched.values.shape),
                                  fetched.positions)

    model = zoo.build("llama", preset="tiny", seed=0)
    prompt = list(range(3, 15))
    try:
        caches.register("test_row_blind", ragged=True)(RowBlindCache)
        caches.register("test_newest_first_rows", ragged=True)(type("Rows", (NewestFirstCache,), {}))
        blind = conformance.check(model, lambda: caches.make("test_row_blind", model), prompt)
        assert not blind.ok and blind.rows and "differs from that row alone" in blind.rows[0]
        good = conformance.check(model, lambda: caches.make("test_newest_first_rows", model), prompt)
        assert good.ok and not good.rows  # stores by slot: the base class makes it ragged
    finally:
        for name in ("test_row_blind", "test_newest_first_rows"):
            if name in CACHES:
                CACHES.remove(name)
    for name in RAGGED:
        for options in caches.examples(name, head_dim=model.config.head_dim, seq_len=24):
            report = conformance.check(model, lambda: caches.make(name, model, **options), prompt, decode=4)
            assert not report.rows, (name, options, report.rows)


@pytest.mark.parametrize("cache_name", RAGGED)
def test_a_saved_ragged_batch_loads_and_continues_bit_exactly(cache_name, tmp_path):
    """caches.save/load keep each row's padding: the loaded batch decodes what the original does."""
    model = zoo.build("llama", seed=4, positional="rope", n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2,
                      d_model=32, vocab_size=40, d_ff=32, max_positions=64, init_std=0.1)
    rng = random.Random(3)
    rows = [[rng.randrange(40) for _ in range(n)] for n in (11, 3, 7)]
    options = caches.examples(cache_name, head_dim=32, seq_len=14)[-1]
    cache = caches.make(cache_name, model, **options)
    batched_logits(model, cache, rows, [11])
    if not cache[0].can_save():
        pytest.skip(f"{cache_name} cannot be saved")
    caches.save(tmp_path / "batch.safetensors", cache)
    loaded, _ = caches.load(tmp_path / "batch.safetensors")
    assert loaded[0].row_padding == cache[0].row_padding == (0, 8, 4)
    step = mx.array([[1], [2], [3]], dtype=mx.int32)
    for _ in range(4):
        a, b = model(step, cache), model(step, loaded)
        assert mx.array_equal(a, b)
        step = mx.argmax(a[:, -1], axis=-1)[:, None].astype(mx.int32)


EXTENDABLE = [n for n in RAGGED if caches.get(n)._extend_rows is not caches.Cache._extend_rows]


@pytest.mark.parametrize("cache_name", EXTENDABLE)
@pytest.mark.parametrize("scheme", positional.available())
def test_rows_joining_a_running_batch_continue_as_if_alone(cache_name, scheme):
    """Continuous batching: a batch decodes a while, new prompts are prefilled apart and join it
    (extend_rows, shorter or longer than the running rows), and every row, old and new, keeps
    giving the logits of that row alone."""
    model = zoo.build("gpt2", seed=6, positional=scheme, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2,
                      d_model=32, vocab_size=40, d_ff=32, max_positions=64, init_std=0.1)
    rng = random.Random(4)
    old = [[rng.randrange(40) for _ in range(n)] for n in (6, 2)]
    new = [[rng.randrange(40) for _ in range(n)] for n in (13, 1)]
    options = caches.examples(cache_name, head_dim=32, seq_len=30)[0]
    running = caches.make(cache_name, model, **options)
    batched_logits(model, running, old, [6])
    joining = caches.make(cache_name, model, **options)
    batched_logits(model, joining, new, [13])
    for a, b in zip(running, joining):
        a.extend_rows(b)
    rows = old + new
    assert running[0].rows == 4
    for n in range(8):  # teacher-forced: a random next token per row
        if n == 4:  # later, shorter prompts join (they get the padding this time)
            late = [[rng.randrange(40) for _ in range(k)] for k in (3, 1)]
            joining = caches.make(cache_name, model, **options)
            batched_logits(model, joining, late, [3])
            for a, b in zip(running, joining):
                a.extend_rows(b)
            rows += late
        step = [rng.randrange(40) for _ in rows]
        out = model(mx.array(step, dtype=mx.int32)[:, None], running)
        for r, t in zip(rows, step):
            r.append(t)
        for b, row in enumerate(rows):
            alone = reference_logits(model, row, running[0].reference)[-1]
            assert max_abs_diff(out[b, -1], alone) <= TOLERANCE, f"row {b} after joining"
    assert running[0].rows == 6
    with pytest.raises(ValueError, match="extend_rows needs"):
        running[0].extend_rows(caches.make("concat" if cache_name != "concat" else "preallocated", model)[0])


@pytest.mark.parametrize("cache_name", EXTENDABLE)
def test_prompts_added_to_a_running_decoder_generate_what_they_generate_alone(cache_name):
    """BatchDecoder.add while run() goes: the new prompts are prefilled apart, join at the next
    step, and every row's greedy tokens are that prompt's alone (zoo.generate_step)."""
    from zoo.batch import BatchDecoder

    model = zoo.build("llama", seed=8, positional="rope", n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2,
                      d_model=32, vocab_size=48, d_ff=32, max_positions=64, init_std=0.3)
    rng = random.Random(5)
    prompts = [[rng.randrange(48) for _ in range(n)] for n in (5, 2, 17, 1, 9)]
    limits = [6, 3, 5, 4, 7]
    options = caches.examples(cache_name, head_dim=32, seq_len=32)[0]
    decoder = BatchDecoder(model, prompts[:2], cache=cache_name, cache_options=options)
    got = {r: [] for r in range(len(prompts))}
    for n, (row, token, _) in enumerate(decoder.run(limits[:2])):
        got[row].append(token)
        if n == 2:  # while the first two decode: a longer and a shorter prompt join
            assert decoder.add(prompts[2:4], max_tokens=limits[2:4]) == [2, 3]
        if row == 1 and len(got[1]) == limits[1]:  # row 1 is done: another one takes its place
            decoder.add([prompts[4]], max_tokens=limits[4])
    for r, prompt in enumerate(prompts):
        alone = [t for t, _ in zoo.generate_step(model, prompt, cache=cache_name, cache_options=options,
                                                 max_tokens=limits[r])]
        assert got[r] == alone, f"row {r}"


def test_adding_prompts_is_refused_for_a_cache_that_cannot_take_rows():
    from zoo.batch import BatchDecoder

    model = zoo.build("llama", preset="tiny", seed=0)
    decoder = BatchDecoder(model, [[1, 2, 3], [4]], cache="rotating", cache_options=dict(max_size=8, keep=2))
    with pytest.raises(ValueError, match="cannot take rows into a running batch"):
        decoder.add([[5, 6]])
    listed = BatchDecoder(model, [[1, 2]], cache=caches.make("concat", model))
    with pytest.raises(ValueError, match="cache given by name"):
        listed.add([[5, 6]])
