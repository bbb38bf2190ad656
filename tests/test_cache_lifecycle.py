"""Life-cycle of every registered cache: trim, save and load, and updates that fail.

Oracles: the uncached forward under the cache's reference (trim), the uninterrupted run of the
canonical generation loop (save/load must continue it bit-exactly), and a twin cache that never
saw the failed update.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import caches
import caches.registry
import zoo
from caches import Cache
from helpers.assets import require_asset

SEQ = 24  # longest sequence any test here runs (12-token prompt + 10 generated)
EXAMPLES = [
    (name, options)
    for name in caches.available()
    for options in caches.get(name).conformance_examples(head_dim=32, seq_len=SEQ)
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'default'}" for n, o in EXAMPLES]


@pytest.fixture(scope="module")
def model():
    return zoo.build("llama", preset="tiny", positional="alibi", n_kv_heads=2, seed=11)


def tokens_of(n, vocab=96, seed=1):
    return [(seed + 31 * i * i + 5 * i) % vocab for i in range(n)]


def feed(model, cache, tokens, chunks):
    outs, start = [], 0
    for size in chunks:
        outs.append(model(mx.array(tokens[start : start + size], dtype=mx.int32)[None], cache)[0])
        start += size
    return mx.concatenate(outs, axis=0)


def snapshot(cache: Cache):
    return cache.offset, [np.array(a) for a in cache.state]


def same_snapshot(cache: Cache, snap) -> bool:
    offset, arrays = snap
    state = [np.array(a) for a in cache.state]
    return cache.offset == offset and len(state) == len(arrays) and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(state, arrays))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register test-only caches without leaking them into other tests."""
    monkeypatch.setattr(caches.registry, "_CACHES", dict(caches.registry._CACHES))


# -- trim ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", EXAMPLES, ids=IDS)
def test_decoding_after_trim_equals_never_having_the_tokens(model, name, options):
    tokens = tokens_of(16)
    junk = [3, 14, 15, 92]
    cache = caches.make(name, model, **options)
    feed(model, cache, tokens[:9] + junk, [5, 8])
    if not cache[0].is_trimmable():
        assert cache[0].size() < cache[0].offset  # only a cache that dropped tokens may refuse
        with pytest.raises(ValueError, match="cannot be trimmed"):
            cache[0].trim(len(junk))
        assert cache[0].offset == 9 + len(junk)
        return
    assert [c.trim(len(junk)) for c in cache] == [len(junk)] * len(cache)
    assert all(c.offset == 9 for c in cache)
    got = feed(model, cache, tokens[9:], [2, 1, 1, 3])
    reference = cache[0].reference
    ref = model(mx.array(tokens)[None], reference=reference)[0]
    assert mx.abs(got - ref[9:]).max().item() <= 1e-4


@pytest.mark.parametrize("name,options", EXAMPLES, ids=IDS)
def test_trim_rejects_bad_counts_and_caps_at_the_offset(model, name, options):
    cache = caches.make(name, model, **options)[0]
    keys = mx.random.normal((1, 2, 3, 32), key=mx.random.key(0))
    cache.update_and_fetch(keys, keys)
    for bad in (-1, 1.5, "2", None, True):
        with pytest.raises(ValueError, match="int n >= 0"):
            cache.trim(bad)
    assert cache.trim(0) == 0 and cache.offset == 3
    assert cache.trim(10) == 3 and cache.offset == 0


# -- save and load -------------------------------------------------------------------------


def generate(model, prompt, cache, n):
    """(tokens, logprobs [n, V]) from the canonical loop: greedy, prefill in chunks of 5."""
    tokens, logprobs = [], []
    for token, lp in zoo.generate_step(model, prompt, cache=cache, max_tokens=n, prefill_step=5):
        tokens.append(token)
        logprobs.append(lp)
    return tokens, mx.stack(logprobs)


@pytest.mark.parametrize("name,options", EXAMPLES, ids=IDS)
def test_a_loaded_cache_continues_generation_bit_exactly(model, name, options, tmp_path):
    prompt = tokens_of(12)
    whole_tokens, whole_logprobs = generate(model, prompt, caches.make(name, model, **options), 10)

    cache = caches.make(name, model, **options)
    first, _ = generate(model, prompt, cache, 4)  # the cache now holds prompt + first[:3]
    path = tmp_path / "cache.safetensors"
    caches.save(path, cache, metadata={"prompt": "twelve tokens"})
    loaded, metadata = caches.load(path)
    assert metadata == {"prompt": "twelve tokens"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert [c.offset for c in loaded] == [c.offset for c in cache] == [12 + 3] * 2
    assert loaded[0].reference.__dict__ == cache[0].reference.__dict__
    rest, rest_logprobs = generate(model, [first[-1]], loaded, 6)
    assert first + rest == whole_tokens
    assert mx.array_equal(rest_logprobs, whole_logprobs[4:]).item()


class ListCache(Cache):
    """A user's own cache: each update kept as a separate chunk, concatenated on fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[tuple[mx.array, mx.array]] = []

    def update_and_fetch(self, keys, values):
        self.check_update(keys, values)
        self.chunks.append((keys, values))
        self._commit_layout(keys, values)
        self.offset += keys.shape[2]
        return self.state

    @property
    def state(self):
        if not self.chunks:
            return ()
        return (mx.concatenate([k for k, _ in self.chunks], axis=2),
                mx.concatenate([v for _, v in self.chunks], axis=2))

    @property
    def meta_state(self):
        return {"offset": str(self.offset), "chunks": str(len(self.chunks))}

    @classmethod
    def from_state(cls, state, meta_state):
        cache = cls()
        if state:
            cache.update_and_fetch(*state)
        return cache


def test_a_users_own_registered_cache_round_trips(model, tmp_path, scratch_registry):
    caches.register("user-list")(ListCache)
    prompt = tokens_of(10)
    whole, whole_logprobs = generate(model, prompt, caches.make("user-list", model), 8)
    cache = caches.make("user-list", model)
    first, _ = generate(model, prompt, cache, 3)
    caches.save(tmp_path / "mine.safetensors", cache)
    loaded, metadata = caches.load(tmp_path / "mine.safetensors")
    assert metadata == {} and all(isinstance(c, ListCache) for c in loaded)
    rest, rest_logprobs = generate(model, [first[-1]], loaded, 5)
    assert first + rest == whole
    assert mx.array_equal(rest_logprobs, whole_logprobs[3:]).item()


def test_empty_caches_round_trip(model, tmp_path):
    cache = caches.make("rotating", model, max_size=8, keep=2)
    caches.save(tmp_path / "empty.safetensors", cache)
    loaded, _ = caches.load(tmp_path / "empty.safetensors")
    assert [c.offset for c in loaded] == [0, 0] and loaded[0].max_size == 8


@pytest.fixture
def saved(model, tmp_path):
    cache = caches.make("preallocated", model)
    feed(model, cache, tokens_of(6), [6])
    path = tmp_path / "good.safetensors"
    caches.save(path, cache)
    return path


def test_truncated_or_garbage_files_are_clear_errors(saved, tmp_path):
    data = saved.read_bytes()
    for label, content in [("truncated", data[: len(data) - 9]), ("header-only", data[:40]),
                           ("empty", b""), ("garbage", b"not a safetensors file" * 20)]:
        bad = tmp_path / f"{label}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            caches.load(bad)


def test_corrupt_array_bytes_fail_the_checksum(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x40  # flip one bit inside the last tensor
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        caches.load(bad)


def test_foreign_files_are_clear_errors(model, tmp_path):
    weights = tmp_path / "model.safetensors"
    model.save_weights(str(weights))
    with pytest.raises(ValueError, match="not a kvzoo cache file.*tensors are"):
        caches.load(weights)
    with pytest.raises(FileNotFoundError):
        caches.load(tmp_path / "missing.safetensors")


def test_a_gguf_model_file_is_a_clear_error():
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        caches.load(require_asset("stories260K/stories260K.gguf"))


def test_a_file_naming_an_unregistered_cache_lists_the_registered_ones(
    model, tmp_path, scratch_registry, monkeypatch
):
    caches.register("user-list")(ListCache)
    cache = caches.make("user-list", model)
    feed(model, cache, tokens_of(3), [3])
    caches.save(tmp_path / "mine.safetensors", cache)
    monkeypatch.setattr(caches.registry, "_CACHES", {
        k: v for k, v in caches.registry._CACHES.items() if k != "user-list"})
    with pytest.raises(ValueError, match="unknown cache 'user-list'; registered caches: concat"):
        caches.load(tmp_path / "mine.safetensors")


def test_save_rejects_what_it_could_not_load_back(model, tmp_path):
    cache = caches.make("concat", model)
    with pytest.raises(TypeError, match="str to str"):
        caches.save(tmp_path / "a.safetensors", cache, metadata={"n": 3})
    with pytest.raises(ValueError, match="reserved"):
        caches.save(tmp_path / "a.safetensors", cache, metadata={"kvzoo.format": "x"})
    with pytest.raises(ValueError, match="not registered"):
        caches.save(tmp_path / "a.safetensors", [ListCache(), ListCache()])
    with pytest.raises(TypeError, match="non-empty list"):
        caches.save(tmp_path / "a.safetensors", [])
    assert not list(tmp_path.iterdir())  # nothing half-written


# -- failed updates change nothing -----------------------------------------------------------


def bad_updates():
    good = mx.zeros((1, 2, 1, 32))
    return [
        ("batch", mx.zeros((2, 2, 1, 32)), mx.zeros((2, 2, 1, 32))),
        ("heads", mx.zeros((1, 3, 1, 32)), mx.zeros((1, 3, 1, 32))),
        ("head dim", mx.zeros((1, 2, 1, 64)), mx.zeros((1, 2, 1, 64))),
        ("dtype", good.astype(mx.float16), good.astype(mx.float16)),
        ("k/v dtypes", good, good.astype(mx.float16)),
        ("k/v lengths", mx.zeros((1, 2, 2, 32)), good),
        ("zero tokens", mx.zeros((1, 2, 0, 32)), mx.zeros((1, 2, 0, 32))),
        ("3-d", mx.zeros((2, 1, 32)), mx.zeros((2, 1, 32))),
        ("numpy", np.zeros((1, 2, 1, 32), np.float32), np.zeros((1, 2, 1, 32), np.float32)),
    ]


def attend_next(cache, keys, values, queries):
    start = cache.offset
    positions = mx.arange(start, start + keys.shape[2], dtype=mx.int32)
    bias = lambda q, k: -0.1 * (q[:, None] - k[None, :]).astype(mx.float32)  # noqa: E731
    return cache.attend(queries, keys, values, scale=0.2, q_positions=positions, bias=bias)


@pytest.mark.parametrize("name,options", EXAMPLES, ids=IDS)
def test_a_failed_update_leaves_the_cache_as_it_was(model, name, options):
    rng = [mx.random.normal((1, 2, 7, 32), key=mx.random.key(i)) for i in range(3)]
    cache, twin = (caches.make(name, model, **options)[0] for _ in range(2))
    for c in (cache, twin):
        attend_next(c, rng[0][:, :, :5], rng[1][:, :, :5], mx.zeros((1, 4, 5, 32)))
    before = snapshot(cache)
    for label, keys, values in bad_updates():
        with pytest.raises((ValueError, TypeError)):
            cache.update_and_fetch(keys, values)
        assert same_snapshot(cache, before), label
    queries = mx.random.normal((1, 4, 2, 32), key=mx.random.key(5))
    after = attend_next(cache, rng[0][:, :, 5:], rng[2][:, :, 5:], queries)
    expected = attend_next(twin, rng[0][:, :, 5:], rng[2][:, :, 5:], queries)
    assert mx.array_equal(after, expected).item()


def test_a_full_fixed_capacity_buffer_refuses_and_keeps_its_contents(model):
    cache, twin = (caches.make("preallocated", model, capacity=6)[0] for _ in range(2))
    keys = mx.random.normal((1, 2, 7, 32), key=mx.random.key(7))
    for c in (cache, twin):
        c.update_and_fetch(keys[:, :, :5], keys[:, :, :5])
    before = snapshot(cache)
    with pytest.raises(ValueError, match="full: capacity 6 tokens, holds 5, cannot add 2"):
        cache.update_and_fetch(keys[:, :, 5:], keys[:, :, 5:])
    assert same_snapshot(cache, before)
    got = cache.update_and_fetch(keys[:, :, 5:6], keys[:, :, 5:6])
    assert all(mx.array_equal(a, b).item()
               for a, b in zip(got, twin.update_and_fetch(keys[:, :, 5:6], keys[:, :, 5:6])))
