"""The rotating-window cache against its oracle: the uncached forward under the window mask.

Oracle: `model(tokens, reference=WindowReference(max_size, keep))`, the full uncached forward
where query p sees keys s <= p with s < keep or s > p - (max_size - keep). While the sequence
fits in max_size that mask is the causal one, so the cache must also match the true model.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import pytest

import caches
import zoo
from caches.rotating import RotatingCache, WindowReference

TOL = 1e-4


def feed(model, cache, tokens, chunks):
    """Logits [sum(chunks), V] from feeding `tokens` through `cache` in `chunks`."""
    outs, start = [], 0
    for size in chunks:
        piece = mx.array(tokens[start : start + size], dtype=mx.int32)[None]
        outs.append(model(piece, cache)[0])
        start += size
    return mx.concatenate(outs, axis=0)


def oracle(model, tokens, reference=None):
    return model(mx.array(tokens, dtype=mx.int32)[None], reference=reference)[0]


def compositions(n):
    """Every way to split n tokens into consecutive chunks (2^(n-1) of them)."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        yield sizes + [size]


def tokens_of(n, vocab=96, seed=3):
    return [(seed + 37 * i * i + 11 * i) % vocab for i in range(n)]


@pytest.fixture(scope="module")
def alibi_mqa():
    return zoo.build("llama", preset="tiny", positional="alibi", n_kv_heads=1, seed=1)


@pytest.fixture(scope="module")
def rope_gqa():
    return zoo.build("llama", preset="tiny", positional="rope", n_kv_heads=2, seed=2)


# -- the window itself ---------------------------------------------------------------------


def test_window_reference_mask_is_sinks_plus_recent():
    ref = WindowReference(max_size=5, keep=2)  # W = 3
    mask = ref.mask(mx.arange(8), mx.arange(8))
    for p in range(8):
        visible = [s for s in range(8) if mask[p, s].item()]
        assert visible == sorted({s for s in range(p + 1) if s < 2 or s > p - 3})
    assert visible == [0, 1, 5, 6, 7]


def test_stored_slots_are_sinks_and_the_last_window_with_their_positions():
    cache = RotatingCache(max_size=6, keep=2)
    keys = mx.random.normal((1, 2, 17, 4), key=mx.random.key(0))
    values = keys * 2
    for t in range(17):
        k, v = cache.update_and_fetch(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        positions = cache.key_positions()
        assert k.shape[2] == min(t + 1, 6) == positions.size
        # every returned slot holds the key of the position key_positions() names
        assert mx.array_equal(k, keys[:, :, positions]).item()
        assert mx.array_equal(v, values[:, :, positions]).item()
        expected = list(range(t + 1)) if t < 6 else [0, 1] + list(range(t - 3, t + 1))
        assert sorted(positions.tolist()) == expected
        assert cache.keys_in_order == (t + 1 <= 6)
    assert cache.wrapped and cache.nbytes == 2 * 1 * 2 * 6 * 4 * 4
    # out of time order once wrapped: sinks 0, 1; position p >= 2 in slot 2 + (p - 2) % 4
    assert cache.key_positions().tolist() == [0, 1, 14, 15, 16, 13]


@pytest.mark.parametrize("max_size,keep", [(4, 0), (5, 2), (3, 2), (1, 0)])
def test_every_chunking_across_the_wrap_matches_the_window_oracle(alibi_mqa, max_size, keep):
    model, n = alibi_mqa, 9
    tokens = tokens_of(n + 3)
    ref = oracle(model, tokens, WindowReference(max_size, keep))
    for chunks in compositions(n):
        cache = caches.make("rotating", model, max_size=max_size, keep=keep)
        got = feed(model, cache, tokens, chunks + [1, 1, 1])  # then three decode steps
        diff = mx.abs(got - ref).max().item()
        assert diff <= TOL, f"chunks {chunks}: max |dlogit| {diff}"
        assert sum(c.nbytes for c in cache) == 2 * 2 * 1 * max_size * 32 * 4  # 2 layers, k and v


def test_every_chunking_matches_with_rope_and_gqa(rope_gqa):
    model, n = rope_gqa, 8
    tokens = tokens_of(n)
    ref = oracle(model, tokens, WindowReference(5, 1))
    for chunks in compositions(n):
        got = feed(model, caches.make("rotating", model, max_size=5, keep=1), tokens, chunks)
        assert mx.abs(got - ref).max().item() <= TOL, chunks


def test_sliding_window_cache_broke_causality_when_a_prefill_chunk_was_longer_than_the_window(
    alibi_mqa, rope_gqa
):
    """Seed bug: a chunk longer than the window saw keys it should not (or lost ones it
    should), so results depended on the chunking. Here W = 4 and a chunk of 11 follows a warm
    cache; with keep > 0 the first query of the chunk needs the 3 tokens before it."""
    for model in (alibi_mqa, rope_gqa):
        tokens = tokens_of(22)
        reference = WindowReference(max_size=6, keep=2)
        ref = oracle(model, tokens, reference)
        true = oracle(model, tokens)
        assert mx.abs(ref - true).max().item() > 1e-2  # the window really hides something here
        for chunks in ([5, 11, 1, 1, 4], [22], [1] * 22, [7, 15], [3, 3, 16]):
            cache = caches.make("rotating", model, max_size=6, keep=2)
            got = feed(model, cache, tokens, chunks)
            assert mx.abs(got - ref).max().item() <= TOL, chunks
            assert cache[0].size() == 6 and cache[0].state[0].shape[2] == 6


class SlotOrderRotating(RotatingCache):
    """The nanoGPT forum bug: rotate the buffer but report positions as if in time order."""

    def _ring_positions(self, offset):
        size = min(offset, self.max_size)
        return mx.arange(size, dtype=mx.int32) + max(0, offset - size)


def test_nanogpt_rolled_its_cache_and_lost_time_order(alibi_mqa):
    """Seed bug: a cache that rolled its keys restarted positions at the slot index, so after
    the wrap ALiBi measured distances to the wrong keys. Positions come from key_positions()."""
    model = alibi_mqa
    tokens = tokens_of(20)
    ref = oracle(model, tokens, WindowReference(max_size=6, keep=0))
    layers = caches.make("rotating", model, max_size=6, keep=0)
    got = feed(model, layers, tokens, [4] + [1] * 16)
    assert mx.abs(got - ref).max().item() <= TOL
    # and the check catches a cache that forgets where its slots are in time
    forgetful = [SlotOrderRotating(max_size=6, keep=0) for _ in model.layers]
    wrong = feed(model, forgetful, tokens, [4] + [1] * 16)
    assert mx.abs(wrong[:6] - ref[:6]).max().item() <= TOL  # fine before the wrap...
    assert mx.abs(wrong - ref).max().item() > 1e-2  # ...wrong after it


# -- exact against the true model while it fits; constant memory past it -------------------


@pytest.mark.parametrize("family,scheme", [("llama", "rope"), ("gpt2", "learned"),
                                           ("gpt2", "alibi")])
def test_exact_against_the_true_model_while_the_sequence_fits(family, scheme):
    model = zoo.build(family, preset="tiny", positional=scheme, seed=4)
    tokens = tokens_of(12)
    cache = caches.make("rotating", model, max_size=12, keep=3)
    got = feed(model, cache, tokens, [5, 1, 6])
    assert mx.abs(got - oracle(model, tokens)).max().item() <= TOL
    assert caches.exact_for("rotating", seq_len=12, max_size=12, keep=3)
    assert not caches.exact_for("rotating", seq_len=13, max_size=12, keep=3)
    assert not caches.exact_for("rotating", max_size=12, keep=3)  # not for every sequence


@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_runs_far_past_max_size_and_the_position_table_at_constant_memory(scheme):
    model = zoo.build("llama", preset="tiny", positional=scheme, seed=5, max_positions=64)
    tokens = tokens_of(300)
    cache = caches.make("rotating", model, max_size=8, keep=2)
    got = [feed(model, cache, tokens[:10], [10])]
    sizes = set()
    for t in tokens[10:]:
        got.append(model(mx.array([[t]]), cache)[0])
        mx.eval(got[-1])
        sizes.add(sum(c.nbytes for c in cache))
        assert cache[0].state[0].shape[2] == 8  # decode writes into the ring, never grows it
    assert sizes == {2 * 2 * 8 * 32 * 4 * 2}  # 2 layers x (k, v) x 2 heads x 8 slots x 32 x fp32
    assert cache[0].offset == 300
    ref = oracle(model, tokens, WindowReference(8, 2))
    assert mx.abs(mx.concatenate(got) - ref).max().item() <= TOL


def test_decode_after_the_wrap_writes_in_place_without_copying_the_ring():
    """Constant memory per step too: a decode step's peak allocation stays far below the
    ring's size (a copy, a concatenation or a roll of the cache would need all of it)."""
    cache = RotatingCache(max_size=1024, keep=4)
    kv = mx.random.normal((1, 4, 1100, 64), key=mx.random.key(3))
    queries = mx.random.normal((1, 4, 1, 64), key=mx.random.key(4))
    mx.eval(kv, queries)
    cache.update_and_fetch(kv[:, :, :1024], kv[:, :, :1024])
    mx.eval(cache.state)

    def step(t):
        new = kv[:, :, t : t + 1]
        out = cache.attend(queries, new, new, scale=0.125, q_positions=mx.array([t]))
        mx.eval(out)

    for t in range(1024, 1030):  # wrap, let the allocator settle
        step(t)
    ring = cache.keys.nbytes
    for t in range(1030, 1040):
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        step(t)
        assert mx.get_peak_memory() - before < ring / 4
        assert cache.keys.nbytes == ring
    assert cache.key_positions().tolist()[:6] == [0, 1, 2, 3, 1024, 1025]


def test_learned_positions_past_the_table_raise_instead_of_wrapping():
    model = zoo.build("gpt2", preset="tiny", max_positions=16)
    cache = caches.make("rotating", model, max_size=6, keep=1)
    feed(model, cache, tokens_of(16), [10, 6])
    with pytest.raises(ValueError, match="position table of 16"):
        model(mx.array([[1]]), cache)
    assert cache[0].offset == 16  # nothing was written


# -- options, trim --------------------------------------------------------------------------


@pytest.mark.parametrize("options,message", [
    (dict(max_size=4, keep=4), "keep \\(4\\) must be smaller than max_size \\(4\\).*0..3"),
    (dict(max_size=4, keep=9), "keep \\(9\\) must be smaller"),
    (dict(max_size=0, keep=0), "max_size must be an int >= 1"),
    (dict(max_size=8, keep=-1), "keep must be an int >= 0"),
    (dict(max_size=8.0, keep=0), "max_size must be an int"),
    (dict(max_size="8", keep=0), "max_size must be an int"),
    (dict(max_size=8, keep=True), "keep must be an int"),
])
def test_bad_options_are_clear_errors(options, message):
    model = zoo.build("llama", preset="tiny")
    with pytest.raises(ValueError, match=message):
        caches.make("rotating", model, **options)


def test_trim_before_the_wrap_and_refused_after(rope_gqa):
    model = rope_gqa
    tokens = tokens_of(10)
    cache = caches.make("rotating", model, max_size=8, keep=2)
    feed(model, cache, tokens[:4] + [5, 6, 7], [3, 4])  # 7 tokens, the last 3 to drop
    assert all(c.is_trimmable() for c in cache)
    assert [c.trim(3) for c in cache] == [3, 3]
    got = feed(model, cache, tokens[4:], [1] * 6)  # runs past max_size after the trim
    ref = oracle(model, tokens, WindowReference(8, 2))
    assert mx.abs(got - ref[4:]).max().item() <= TOL
    assert not cache[0].is_trimmable()
    with pytest.raises(ValueError, match="once it has wrapped"):
        cache[0].trim(1)
    assert cache[0].offset == 10


def test_mlx_lms_rotating_cache_agrees_on_identical_weights():
    """An oracle nobody here wrote: mlx-lm's RotatingKVCache on the same weights. It agrees
    token by token with sinks, and for any chunking without them. (With keep > 0 and a
    multi-token chunk that crosses the window, mlx-lm's own results depend on the chunking:
    docs/caches.md.)"""
    from mlx_lm.models.cache import RotatingKVCache

    from zoo.checkpoints.mlx_lm import to_mlx_lm

    model = zoo.build("llama", preset="tiny", seed=3)
    twin = to_mlx_lm(model)
    tokens = tokens_of(20)
    for keep, chunk_sets in ((0, ([1] * 20, [5, 10, 5], [20])), (2, ([1] * 20, [4] + [1] * 16))):
        for chunks in chunk_sets:
            theirs = [RotatingKVCache(max_size=6, keep=keep) for _ in model.layers]
            outs, start = [], 0
            for size in chunks:
                outs.append(twin(mx.array(tokens[start : start + size])[None], cache=theirs)[0])
                start += size
            ours = feed(model, caches.make("rotating", model, max_size=6, keep=keep), tokens, chunks)
            assert mx.abs(mx.concatenate(outs) - ours).max().item() <= TOL, (keep, chunks)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_a_half_precision_ring_stores_and_returns_half_precision(dtype):
    """Keys and values of float16/bfloat16 stay so through the ring's growth and its wrap: the
    returned values are the written ones exactly, and the bytes are two per number."""
    cache = RotatingCache(max_size=6, keep=2)
    keys = mx.random.normal((1, 2, 9, 8), key=mx.random.key(7)).astype(dtype)  # [B, H, L, D]
    values = mx.random.normal((1, 2, 9, 8), key=mx.random.key(8)).astype(dtype)
    for start, stop in ((0, 3), (3, 6), (6, 8), (8, 9)):  # grows, wraps, then one decode step
        fetched_k, fetched_v = cache.update_and_fetch(keys[:, :, start:stop], values[:, :, start:stop])
        assert fetched_k.dtype == fetched_v.dtype == dtype
    assert cache.nbytes == 2 * 1 * 2 * 6 * 8 * 2  # keys and values, B=1, H=2, 6 slots, D=8, 2 bytes
    held = cache.key_positions().tolist()  # after a one-token step: the slots, in stored order
    assert sorted(held) == [0, 1, 5, 6, 7, 8]  # the two sinks and the last four
    assert mx.array_equal(fetched_v, values[:, :, held]).item()
