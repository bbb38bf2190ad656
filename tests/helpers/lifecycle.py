"""Life-cycle checks any registered cache must pass: trim, save and load, failed updates.

Oracles: the uncached forward under the cache's reference (trim), the uninterrupted run of the
canonical generation loop (save/load must continue it bit-exactly), and a twin cache that never
saw the failed update. A cache that says it cannot trim (`is_trimmable()`) or save (no `state`
or `_restore`) is checked for saying so clearly instead. Used by tests/test_cache_lifecycle.py
for the registered caches and tests/test_extending.py for the documented example caches.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import caches
import zoo
from caches import Cache


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


def check_trim(model, name, options):
    """Decoding after trim equals never having had the trimmed tokens (or a clear refusal)."""
    tokens = tokens_of(16)
    junk = [3, 14, 15, 92]
    cache = caches.make(name, model, **options)
    feed(model, cache, tokens[:9] + junk, [5, 8])
    if not cache[0].is_trimmable():
        with pytest.raises(ValueError, match="cannot be trimmed"):
            cache[0].trim(len(junk))
        assert cache[0].offset == 9 + len(junk)
        return False
    assert [c.trim(len(junk)) for c in cache] == [len(junk)] * len(cache)
    assert all(c.offset == 9 for c in cache)
    got = feed(model, cache, tokens[9:], [2, 1, 1, 3])
    ref = model(mx.array(tokens)[None], reference=cache[0].reference)[0]
    assert mx.abs(got - ref[9:]).max().item() <= 1e-4
    return True


def generate(model, prompt, cache, n):
    """(tokens, logprobs [n, V]) from the canonical loop: greedy, prefill in chunks of 5."""
    tokens, logprobs = [], []
    for token, lp in zoo.generate_step(model, prompt, cache=cache, max_tokens=n, prefill_step=5):
        tokens.append(token)
        logprobs.append(lp)
    return tokens, mx.stack(logprobs)


def check_save_load(model, name, options, tmp_path):
    """A saved and loaded cache continues generation bit-exactly (or saving is refused clearly)."""
    prompt = tokens_of(12)
    whole_tokens, whole_logprobs = generate(model, prompt, caches.make(name, model, **options), 10)
    cache = caches.make(name, model, **options)
    first, _ = generate(model, prompt, cache, 4)  # the cache now holds prompt + first[:3]
    path = tmp_path / "cache.safetensors"
    if not cache[0].can_save():
        with pytest.raises((ValueError, TypeError, NotImplementedError), match="cannot be saved"):
            caches.save(path, cache)
        assert not path.exists()
        return False
    caches.save(path, cache, metadata={"prompt": "twelve tokens"})
    loaded, metadata = caches.load(path)
    assert metadata == {"prompt": "twelve tokens"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert [c.offset for c in loaded] == [c.offset for c in cache] == [12 + 3] * len(cache)
    assert repr(loaded[0].reference) == repr(cache[0].reference)
    rest, rest_logprobs = generate(model, [first[-1]], loaded, 6)
    assert first + rest == whole_tokens
    assert mx.array_equal(rest_logprobs, whole_logprobs[4:]).item()
    return True


def bad_updates(B=1, H=2, D=32):
    good = mx.zeros((B, H, 1, D))
    return [
        ("batch", mx.zeros((B + 1, H, 1, D)), mx.zeros((B + 1, H, 1, D))),
        ("heads", mx.zeros((B, H + 1, 1, D)), mx.zeros((B, H + 1, 1, D))),
        ("head dim", mx.zeros((B, H, 1, 2 * D)), mx.zeros((B, H, 1, 2 * D))),
        ("dtype", good.astype(mx.float16), good.astype(mx.float16)),
        ("k/v dtypes", good, good.astype(mx.float16)),
        ("k/v lengths", mx.zeros((B, H, 2, D)), good),
        ("zero tokens", mx.zeros((B, H, 0, D)), mx.zeros((B, H, 0, D))),
        ("3-d", mx.zeros((H, 1, D)), mx.zeros((H, 1, D))),
        ("numpy", np.zeros((B, H, 1, D), np.float32), np.zeros((B, H, 1, D), np.float32)),
    ]


def attend_next(cache, keys, values, queries):
    start = cache.offset
    positions = mx.arange(start, start + keys.shape[2], dtype=mx.int32)
    bias = lambda q, k: -0.1 * (q[:, None] - k[None, :]).astype(mx.float32)  # noqa: E731
    return cache.attend(queries, keys, values, scale=0.2, q_positions=positions, bias=bias)


def check_failed_update(model, name, options):
    """Every refused update leaves the cache exactly as it was, and it then works on."""
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
