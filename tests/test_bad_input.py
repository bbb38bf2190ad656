"""Every misuse fails early with a clear error that says what was wrong and what is allowed,
and leaves state as it was."""

from __future__ import annotations

import mlx.core as mx
import pytest

import caches
import positional
import sampling
import zoo
from zoo.cli import main as cli


@pytest.fixture(scope="module")
def model():
    return zoo.build("llama", preset="tiny", seed=0)


# -- registries ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, listed",
    [
        (lambda m: caches.make("ring", m), caches.available()),
        (lambda m: caches.get("ring"), caches.available()),
        (lambda m: positional.get("sinusoidal"), positional.available()),
        (lambda m: sampling.make("beam"), sampling.available()),
        (lambda m: zoo.build("mamba"), zoo.available()),
        (lambda m: zoo.build("llama", positional="sinusoidal"), positional.available()),
    ],
)
def test_unknown_names_list_what_is_registered(model, call, listed):
    with pytest.raises(ValueError) as error:
        call(model)
    for name in listed:
        assert name in str(error.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny"):
        zoo.build("gpt2", preset="huge")


def test_unknown_config_field_is_named():
    with pytest.raises(TypeError, match="n_experts"):
        zoo.build("gpt2", preset="tiny", n_experts=8)


def test_unknown_cache_option_lists_accepted_options(model):
    with pytest.raises(TypeError, match=r"'size'.*step, capacity"):
        caches.make("preallocated", model, size=4)


@pytest.mark.parametrize("options", [dict(step=0), dict(step=1.5), dict(capacity=0), dict(capacity="8")])
def test_impossible_preallocated_options(model, options):
    with pytest.raises(ValueError, match="preallocated cache"):
        caches.make("preallocated", model, **options)


def test_unknown_sampler_option(model):
    with pytest.raises(TypeError, match="temp"):
        sampling.make("temperature", temperature=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        sampling.make("temperature", temp=-1)


def test_registering_a_non_cache_is_refused():
    with pytest.raises(TypeError, match="Cache subclass"):
        caches.register("bogus")(dict)


# -- model configs ------------------------------------------------------------------------------

def test_heads_must_divide_into_kv_groups():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        zoo.build("llama", preset="tiny", n_heads=6, n_kv_heads=4)


@pytest.mark.parametrize("field, value", [("n_layers", 0), ("vocab_size", -3), ("d_model", 2.5),
                                          ("n_kv_heads", 0), ("max_positions", True)])
def test_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        zoo.build("gpt2", preset="tiny", **{field: value})


def test_head_dim_must_be_given_when_d_model_does_not_divide():
    with pytest.raises(ValueError, match="set head_dim"):
        zoo.build("gpt2", d_model=30, n_heads=4, head_dim=None, vocab_size=10, n_layers=1)


def test_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        zoo.build("llama", preset="tiny", head_dim=7)


# -- tokens -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [[[5, 96]], [[-1, 3]]])
def test_token_ids_outside_the_vocabulary(model, bad):
    cache = caches.make("concat", model)
    with pytest.raises(ValueError, match=r"outside the vocabulary: ids must be in \[0, 96\)"):
        model(mx.array(bad), cache)
    assert cache[0].offset == 0 and cache[0].keys is None


def test_tokens_must_be_integer_2d(model):
    with pytest.raises(TypeError, match="integer"):
        model(mx.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(mx.array([1, 2]))
    with pytest.raises(ValueError, match=r"L >= 1"):
        model(mx.zeros((1, 0), dtype=mx.int32))
    with pytest.raises(TypeError, match="mx.array"):
        model([[1, 2]])


def test_cache_must_have_one_entry_per_layer(model):
    with pytest.raises(ValueError, match="2 layers"):
        model(mx.array([[1]]), caches.make("concat", model)[:1])


def test_cache_and_reference_are_exclusive(model):
    cache = caches.make("concat", model)
    with pytest.raises(ValueError, match="either a cache or a reference"):
        model(mx.array([[1]]), cache, reference=cache[0].reference)


# -- generation ---------------------------------------------------------------------------------

def test_empty_prompt(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        next(zoo.generate_step(model, []))


def test_prompt_outside_vocabulary(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        next(zoo.generate_step(model, [1, 2, 500]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(prefill_step=0), "prefill_step"),
    (dict(vocab_size=97), "vocab_size"),
    (dict(cache="concat", cache_options={"step": 2}), "unknown option"),
    (dict(cache=[1, 2]), "list of 2 Cache objects"),
])
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        next(zoo.generate_step(model, [1, 2, 3], **kwargs))


# -- caches: a rejected update leaves the cache as it was ----------------------------------------

def snapshot(cache):
    return cache.offset, [mx.array(a) for a in cache.state]


def assert_unchanged(cache, before):
    offset, arrays = before
    assert cache.offset == offset
    assert len(cache.state) == len(arrays)
    for a, b in zip(cache.state, arrays):
        assert a.shape == b.shape and mx.array_equal(a, b)


def kv(B=1, H=2, L=3, D=64, dtype=mx.float32, seed=0):
    k = mx.random.normal((B, H, L, D), key=mx.random.key(seed)).astype(dtype)
    return k, k + 1


def first_example(name: str):
    """A cache built with the first option set it declares for head_dim 64."""
    return caches.get(name)(**caches.examples(name, head_dim=64, seq_len=64)[0])


@pytest.mark.parametrize("name", caches.available())
@pytest.mark.parametrize("bad", [dict(H=3), dict(D=32), dict(B=2), dict(dtype=mx.float16)])
def test_mismatched_update_is_rejected_without_change(name, bad):
    cache = first_example(name)
    cache.update_and_fetch(*kv())
    before = snapshot(cache)
    with pytest.raises((ValueError, TypeError)):
        cache.update_and_fetch(*kv(**{"L": 1, **bad}))
    assert_unchanged(cache, before)


@pytest.mark.parametrize("name", caches.available())
def test_malformed_update_is_rejected(name):
    cache = first_example(name)
    k, v = kv()
    with pytest.raises(ValueError, match=r"\[B, n_kv_heads, L, head_dim\]"):
        cache.update_and_fetch(k[0], v[0])
    with pytest.raises(ValueError, match="must agree"):
        cache.update_and_fetch(k, v[:, :1])
    with pytest.raises(TypeError, match="mx.array"):
        cache.update_and_fetch(k.tolist(), v)
    assert cache.offset == 0


def test_full_fixed_capacity_cache_is_rejected_without_change():
    cache = caches.get("preallocated")(capacity=4)
    cache.update_and_fetch(*kv(L=3))
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"full: capacity 4 tokens, holds 3, cannot add 2"):
        cache.update_and_fetch(*kv(L=2, seed=1))
    assert_unchanged(cache, before)
    cache.update_and_fetch(*kv(L=1, seed=2))  # what fits still goes in
    assert cache.offset == 4


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_reports_unknown_names_cleanly(capsys):
    assert cli(["check", "--caches", "ring"]) == 2
    err = capsys.readouterr().err
    assert "unknown cache 'ring'" in err and "concat" in err
