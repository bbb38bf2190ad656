"""kvzoo's own affine quantization (caches/affine.py) against mx.quantize itself, and the
quantized cache on heads narrower than mx.quantize's smallest group (stories260K: head size 8).

Oracles: mx.quantize + mx.dequantize for the groups it supports (value for value), and for a
narrow group g, mx.quantize on a 32-wide group made of the g values repeated 32/g times (same
min and max, so the same grid); the uncached forward under the cache's rounding reference.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import caches
import zoo
from caches import affine, conformance
from helpers.assets import require_asset


@pytest.mark.parametrize("bits", affine.ALLOWED_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_equals_mx_quantize_where_it_applies(bits, group_size):
    x = mx.random.normal((2, 3, 5, 128), key=mx.random.key(bits)) * 3
    theirs = mx.dequantize(*mx.quantize(x, group_size=group_size, bits=bits), group_size=group_size, bits=bits)
    assert mx.array_equal(affine.round_trip(x, bits, group_size), theirs).item()
    _, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    _, our_scales, our_biases = affine.quantize(x, bits, group_size)
    assert mx.allclose(our_scales, scales, rtol=1e-6, atol=0).item()
    assert mx.array_equal(our_biases, biases).item()


@pytest.mark.parametrize("bits", affine.ALLOWED_BITS)
@pytest.mark.parametrize("group_size", [4, 8, 16])
def test_a_narrow_group_rounds_as_mx_quantize_rounds_it_repeated(bits, group_size):
    x = mx.random.normal((7, 32), key=mx.random.key(10 + bits)) * 2
    groups = x.reshape(-1, group_size)  # [G, g]
    tiled = mx.tile(groups, (1, 32 // group_size))  # [G, 32]: the same values, same min and max
    theirs = mx.dequantize(*mx.quantize(tiled, group_size=32, bits=bits), group_size=32, bits=bits)
    theirs = theirs[:, :group_size].reshape(x.shape)
    assert mx.array_equal(affine.round_trip(x, bits, group_size), theirs).item()


@pytest.mark.parametrize("bits", affine.ALLOWED_BITS)
def test_packing_holds_bits_per_value_and_round_trips(bits):
    levels = mx.random.randint(0, 2**bits, (3, 5, 16), key=mx.random.key(bits)).astype(mx.uint8)
    packed = affine.pack(levels, bits)
    assert packed.dtype == mx.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    assert mx.array_equal(affine.unpack(packed, bits), levels).item()


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        affine.quantize(mx.zeros((1, 8)), 7, 8)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        affine.quantize(mx.zeros((1, 8)), 4, 3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        caches.make("quantized", zoo.build("llama", preset="tiny"), group_size=12)


@pytest.fixture(scope="module")
def stories():
    return zoo.load_model(require_asset("stories260K/stories260K.gguf"))


@pytest.mark.parametrize("options", [dict(bits=4, group_size=8), dict(bits=2, group_size=8),
                                     dict(group_size=4, key_bits=8, value_bits=3)])
def test_quantized_serves_stories260k_exactly_against_its_rounding_reference(stories, options):
    model = stories
    assert model.config.head_dim == 8  # narrower than mx.quantize's smallest group
    prompt = [1, 403, 407, 261, 378, 297, 379, 268, 299, 312, 281, 265]
    for chunks in ([12], [5, 1, 6]):
        report = conformance.check(model, lambda: caches.make("quantized", model, **options), prompt,
                                   chunks=chunks, decode=8)
        assert report.ok, report
        assert report.true_max_abs_diff > 1e-3  # the rounding is really there
    cache = caches.make("quantized", model, **options)
    model(mx.array([prompt]), cache)
    cfg = model.config
    rows = cfg.n_layers * cfg.n_kv_heads * len(prompt)  # (layer, kv head, token) rows of 8 values
    bits = [options.get("key_bits", options.get("bits")), options.get("value_bits", options.get("bits"))]
    scales = 2 * 4 * (8 // options["group_size"])  # one fp32 scale and bias per group
    held = sum(a.nbytes for c in cache for a in c.state)
    assert held == rows * sum(8 * b // 8 + scales for b in bits)  # b bits per value, packed

def test_narrow_groups_are_refused_for_mlx_lm_models_with_the_reason():
    cache = caches.make("quantized", zoo.build("llama", preset="tiny"), group_size=8)[0]
    with pytest.raises(NotImplementedError, match="needs groups of"):
        cache.make_mask(1)
