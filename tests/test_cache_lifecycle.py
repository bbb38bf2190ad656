"""Life-cycle of every registered cache: trim, save and load, and updates that fail.

Oracles: the uncached forward under the cache's reference (trim), the uninterrupted run of the
canonical generation loop (save/load must continue it bit-exactly), and a twin cache that never
saw the failed update.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import caches
import zoo
from helpers.assets import require_asset
from helpers.lifecycle import (check_failed_update, check_save_load, check_trim, feed, generate,
                               same_snapshot, snapshot, tokens_of)
from helpers.user_caches import NewestFirstCache

SEQ = 24  # longest sequence any test here runs (12-token prompt + 10 generated)
EXAMPLES = [
    (name, options)
    for name in caches.available()
    for options in caches.examples(name, head_dim=32, seq_len=SEQ)
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'default'}" for n, o in EXAMPLES]


@pytest.fixture(scope="module")
def model():
    return zoo.build("llama", preset="tiny", positional="alibi", n_kv_heads=2, seed=11)


# -- trim ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", EXAMPLES, ids=IDS)
def test_decoding_after_trim_equals_never_having_the_tokens(model, name, options):
    if not check_trim(model, name, options):
        cache = caches.make(name, model, **options)
        feed(model, cache, tokens_of(13), [13])
        # Only a cache that dropped tokens, or lost their precision past the trim horizon it
        # declares (kivi: quantized values cannot be made exact again), may refuse.
        horizon = cache[0].trim_horizon()
        assert cache[0].size() < cache[0].offset or (horizon is not None and horizon < cache[0].offset)


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


@pytest.mark.parametrize("name,options", EXAMPLES, ids=IDS)
def test_a_loaded_cache_continues_generation_bit_exactly(model, name, options, tmp_path, monkeypatch):
    # Bit-exact means the same kernels on both sides: the compiled decode step (zoo/runtime/
    # compiled.py) runs only while a preallocated buffer has room, which a loaded cache (saved
    # at its offset) lacks for one step, and it equals the plain step up to summation order.
    monkeypatch.setenv("KVZOO_COMPILE", "off")
    assert check_save_load(model, name, options, tmp_path)  # every built-in cache can be saved


def _saved_midway_continues(model, name, prompt, before, total, path, check_loaded):
    """Generate `total` tokens with cache `name` in one go, and again saving the cache after
    `before` of them and continuing from the loaded copy (first checked by `check_loaded(caches,
    metadata)`): the same tokens and bit-identical log-probabilities."""
    whole, whole_logprobs = generate(model, prompt, caches.make(name, model), total)
    cache = caches.make(name, model)
    first, _ = generate(model, prompt, cache, before)
    caches.save(path, cache)
    loaded, metadata = caches.load(path)
    check_loaded(loaded, metadata)
    rest, rest_logprobs = generate(model, [first[-1]], loaded, total - before)
    assert first + rest == whole
    assert mx.array_equal(rest_logprobs, whole_logprobs[before:]).item()


def test_a_users_own_registered_cache_round_trips(model, tmp_path, registered):
    registered("user-newest-first", NewestFirstCache)

    def check(loaded, metadata):
        assert metadata == {} and all(isinstance(c, NewestFirstCache) for c in loaded)

    _saved_midway_continues(model, "user-newest-first", tokens_of(10), 3, 8, tmp_path / "mine.safetensors", check)


class OffsetOnlyCache(NewestFirstCache):
    """A user's cache that saves only its offset, as mlx-lm's caches do: it has no options."""

    @property
    def meta_state(self):
        return {"offset": str(self.offset)}


def test_a_meta_state_of_only_the_offset_loads_and_continues(model, tmp_path, registered):
    registered("user-offset-only", OffsetOnlyCache)

    def check(loaded, metadata):
        assert [c.offset for c in loaded] == [10] * len(model.layers)

    _saved_midway_continues(model, "user-offset-only", tokens_of(9), 2, 7, tmp_path / "offset.safetensors", check)


def test_saved_options_the_cache_does_not_take_are_a_clear_error(model, tmp_path):
    cache = caches.make("rotating", model, max_size=8, keep=2)
    meta = {**cache[0].meta_state, "options": '{"max_size": 8, "sinks": 2}'}
    with pytest.raises(ValueError, match="corrupt RotatingCache metadata: options .*'sinks'"):
        type(cache[0]).from_state((), meta)
    defaults = type(cache[0]).from_state((), {"offset": "0"})  # no options: the defaults
    assert defaults.options() == caches.get("rotating")().options()


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


def test_a_file_naming_an_unregistered_cache_lists_the_registered_ones(model, tmp_path, registered):
    registered("user-list", NewestFirstCache)
    cache = caches.make("user-list", model)
    feed(model, cache, tokens_of(3), [3])
    caches.save(tmp_path / "mine.safetensors", cache)
    caches.registry.CACHES.remove("user-list")
    with pytest.raises(ValueError, match="unknown cache 'user-list'; registered caches: concat"):
        caches.load(tmp_path / "mine.safetensors")


def test_save_rejects_what_it_could_not_load_back(model, tmp_path):
    cache = caches.make("concat", model)
    with pytest.raises(TypeError, match="str to str"):
        caches.save(tmp_path / "a.safetensors", cache, metadata={"n": 3})
    with pytest.raises(ValueError, match="reserved"):
        caches.save(tmp_path / "a.safetensors", cache, metadata={"kvzoo.format": "x"})
    with pytest.raises(ValueError, match="not registered"):
        caches.save(tmp_path / "a.safetensors", [NewestFirstCache(), NewestFirstCache()])
    with pytest.raises(TypeError, match="non-empty list"):
        caches.save(tmp_path / "a.safetensors", [])
    assert not list(tmp_path.iterdir())  # nothing half-written


# -- failed updates change nothing -----------------------------------------------------------


@pytest.mark.parametrize("name,options", EXAMPLES, ids=IDS)
def test_a_failed_update_leaves_the_cache_as_it_was(model, name, options):
    check_failed_update(model, name, options)


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
