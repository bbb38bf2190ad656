"""The quantized cache against its oracle: the uncached forward on keys and values rounded
through mx.quantize/mx.dequantize (QuantizedReference), and its drift from the true model."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import caches
import zoo
from caches import conformance
from caches.quantized import QuantizedCache, QuantizedReference, affine_grid, round_trip
from helpers.equivalence import reference_gap

TOL = 1e-4


def feed(model, cache, tokens, chunks):
    outs, start = [], 0
    for size in chunks:
        outs.append(model(mx.array(tokens[start : start + size], dtype=mx.int32)[None], cache)[0])
        start += size
    return mx.concatenate(outs, axis=0)


def oracle(model, tokens, reference=None):
    return model(mx.array(tokens, dtype=mx.int32)[None], reference=reference)[0]


def tokens_of(n, vocab=96, seed=5):
    return [(seed + 29 * i * i + 7 * i) % vocab for i in range(n)]


@pytest.mark.parametrize("family,scheme,n_kv_heads", [
    ("llama", "rope", 4), ("llama", "rope", 2), ("llama", "alibi", 1), ("llama", "alibi", 2),
    ("gpt2", "learned", 4), ("gpt2", "alibi", 4), ("gpt2", "rope", 1),
])
@pytest.mark.parametrize("options", [
    dict(bits=4, group_size=32), dict(bits=2, group_size=32),
    dict(group_size=32, key_bits=8, value_bits=3),
])
def test_exact_against_the_rounded_oracle_for_any_chunking(family, scheme, n_kv_heads, options):
    model = zoo.build(family, preset="tiny", positional=scheme, n_kv_heads=n_kv_heads, seed=6)
    tokens = tokens_of(20)
    reference = caches.make("quantized", model, **options)[0].reference
    ref = oracle(model, tokens, reference)
    true = oracle(model, tokens)
    assert mx.abs(ref - true).max().item() > 1e-3  # the rounding is really there
    for chunks in ([20], [1] * 20, [6, 1, 9, 4], [2, 17, 1]):
        cache = caches.make("quantized", model, **options)
        got = feed(model, cache, tokens, chunks)
        assert reference_gap(model, cache, tokens, got).diff <= TOL, chunks


def boundary_case():
    """Keys [1, 1, 2, 32] (two tokens, one group each) with one interior value placed exactly
    midway between two 8-bit levels, and the group's scale and bias."""
    x = mx.random.normal((1, 1, 2, 32), key=mx.random.key(3))
    _, scales, biases = mx.quantize(x, group_size=32, bits=8)
    scale, bias = scales[0, 0, 1, 0].item(), biases[0, 0, 1, 0].item()
    row = x[0, 0, 1]
    i = next(j for j in range(32) if j not in (mx.argmin(row).item(), mx.argmax(row).item()))
    level = (row[i].item() - bias) / scale
    x[0, 0, 1, i] = bias + (int(level) + 0.5) * scale  # min and max unchanged: same grid
    return x, i, scale


def test_rounding_flips_accepts_only_one_step_on_a_boundary():
    reference = QuantizedReference(8, 32)
    x, i, scale = boundary_case()
    values = mx.zeros_like(x)
    stored = round_trip(x, 8, 32)
    assert reference.rounding_flips((x, values), (stored, round_trip(values, 8, 32))) == (0, None)

    def moved(j, steps):
        out = mx.array(stored)
        rounded = out[0, 0, 1, j].item()
        other = rounded + steps * abs(scale) * (1 if x[0, 0, 1, j].item() > rounded else -1)
        out[0, 0, 1, j] = other
        return out

    # The boundary value stored at the other neighbouring level: one flip, explained.
    assert reference.rounding_flips((x, values), (moved(i, 1), values)) == (1, None)
    # Two steps away, or one step away from a value that is not on a boundary: not explained.
    flips, problem = reference.rounding_flips((x, values), (moved(i, 2), values))
    assert flips == 0 and "other than a one-step flip" in problem
    flips, problem = reference.rounding_flips((x, values), (moved((i + 1) % 32, 1), values))
    assert flips == 0 and "other than a one-step flip" in problem


def zero_point_boundary_group() -> tuple[mx.array, mx.array]:
    """Two copies of a group whose edge / scale sits on the half-integer -130.5 at 8 bits, a
    few ulps apart, so mx.quantize rounds their zero point to different levels (the group the
    property test found, from a Llama with exact GELU)."""
    import numpy as np

    g = np.random.RandomState(0).uniform(-0.98, 0.94, 32).astype(np.float32)
    g[0], g[1] = -0.9865141, 0.94115686
    nudged = g.copy()
    nudged[0] += 5e-7
    return mx.array(g)[None], mx.array(nudged)[None]


def test_a_group_on_its_zero_point_boundary_may_hold_the_other_grid():
    a, b = zero_point_boundary_group()
    qa, qb = round_trip(a, 8, 32), round_trip(b, 8, 32)
    assert mx.abs(qa - qb).max().item() > 1e-3  # noise of 5e-7 moved the whole grid
    other, on_boundary = affine_grid(a, 8, 32, other_side=True)
    assert on_boundary.all().item()
    assert mx.abs(other - qb).max().item() <= 2e-6  # the other grid is mx.quantize's for b
    reference = QuantizedReference(8, 32)
    zeros = mx.zeros_like(a)
    assert reference.rounding_flips((a, zeros), (qb, zeros))[1] is None
    # A group far from its zero-point boundary gets no such pass.
    far = a * 1.003
    flips, problem = reference.rounding_flips((far, zeros), (round_trip(far * 1.01, 8, 32), zeros))
    assert problem is not None


def test_the_grid_formula_is_mx_quantize_itself():
    import numpy as np

    rng = np.random.RandomState(1)
    for bits in (2, 3, 4, 8):
        x = mx.array((rng.randn(16, 64) * rng.uniform(0.1, 3)).astype(np.float32))
        grid, on_boundary = affine_grid(x, bits, 32)
        assert mx.array_equal(grid, round_trip(x, bits, 32)).item()
        assert not on_boundary.all().item()
        other, _ = affine_grid(x, bits, 32, other_side=True)
        assert mx.abs(other - grid).max().item() > 0


class MislabelledQuantizedCache(QuantizedCache):
    """Stores 6-bit keys while declaring the 8-bit reference: close, but not what it claims."""

    def __init__(self, **options):
        super().__init__(bits=8, group_size=32)
        self.reference = QuantizedReference(bits=8, group_size=32)  # declared...
        self.key_bits = 6  # ...but not what it stores


def test_the_kit_explains_boundary_flips_but_not_a_wrong_rounding():
    model = zoo.build("llama", preset="tiny", n_kv_heads=2, seed=6)
    tokens = tokens_of(20)
    report = conformance.check(model, lambda: [MislabelledQuantizedCache() for _ in model.layers],
                               tokens[:14], chunks=[5, 1, 8], decode=6)
    assert not report.ok and report.max_abs_diff > TOL
    assert report.problem and "stored keys differ from the rounded oracle" in report.problem
    good = conformance.check(model, lambda: caches.make("quantized", model, bits=8, group_size=32),
                             tokens[:14], chunks=[5, 1, 8], decode=6)
    assert good.ok and good.problem is None and good.exact_diff <= TOL


def test_keys_are_read_packed_never_dequantized_whole(monkeypatch):
    """Attention goes through mx.quantized_matmul on the packed cache."""
    model = zoo.build("llama", preset="tiny", seed=7)
    cache = caches.make("quantized", model, bits=4, group_size=32)
    feed(model, cache, tokens_of(6), [5])
    calls = []
    real = mx.quantized_matmul

    def spy(x, w, *args, **kwargs):
        calls.append(w.shape)
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", spy)
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: pytest.fail("dequantized the cache"))
    feed(model, cache, tokens_of(7)[-1:], [1])
    # per layer: scores against the packed keys, then the packed values; 6 tokens stored.
    # One query: the kv heads' packed arrays [B, Hkv, S, D*bits/32] are used as stored.
    assert calls == [(1, 2, 6, 32 * 4 // 32)] * 4


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_stored_values_are_within_one_quantization_step(bits, group_size):
    """mx.quantize's affine rounding keeps zero and the group's larger-magnitude end exact,
    so the far end of a group can be clipped: the error is at most half a step inside the
    grid, and at most one step (|scale|) anywhere. Checked on what the cache stores."""
    cache = QuantizedCache(bits=bits, group_size=group_size)
    x = mx.random.normal((1, 2, 40, 128), key=mx.random.key(bits)) * 3
    cache.update_and_fetch(x, -x)
    for (packed, scales, biases), original in ((cache.state[:3], x), (cache.state[3:], -x)):
        restored = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
        groups = (1, 2, 40, 128 // group_size, group_size)
        err = mx.abs(original - restored).reshape(groups)
        step = mx.abs(scales)[..., None]
        grid_end = biases[..., None] + (2**bits - 1) * scales[..., None]
        low, high = mx.minimum(biases[..., None], grid_end), mx.maximum(biases[..., None], grid_end)
        inside = (original.reshape(groups) >= low) & (original.reshape(groups) <= high)
        slack = 1e-5 * (1 + mx.abs(original).max().item())
        assert mx.all(err <= step + slack).item()
        assert mx.all(mx.where(inside, err <= step / 2 + slack, True)).item()


def test_drift_from_the_true_model_shrinks_with_more_bits():
    """The drift is measured, not hidden: more bits, closer to the true model (tiny random
    llama, head size 64, 48 tokens; numbers for docs/caches.md come from docs/measure_caches.py)."""
    model = zoo.build("llama", preset="tiny", head_dim=64, seed=8)
    tokens = tokens_of(48)
    true = oracle(model, tokens)
    drift, agree = {}, {}
    for bits in (2, 4, 8):
        got = feed(model, caches.make("quantized", model, bits=bits, group_size=64), tokens, [16] + [1] * 32)
        drift[bits] = mx.abs(got - true).max().item()
        agree[bits] = (mx.argmax(got, -1) == mx.argmax(true, -1)).mean().item()
    assert drift[8] < drift[4] < drift[2]
    assert drift[8] < 0.05 and agree[8] >= 0.95
    assert agree[2] < 1.0 or drift[2] > 10 * drift[8]


def test_4_bit_group_64_takes_at_most_30_percent_of_fp16():
    keys = mx.random.normal((1, 4, 256, 64), key=mx.random.key(9)).astype(mx.float16)
    values = mx.random.normal((1, 4, 256, 64), key=mx.random.key(10)).astype(mx.float16)
    quantized = QuantizedCache(bits=4, group_size=64)
    quantized.update_and_fetch(keys, values)
    plain = caches.get("concat")()
    plain.update_and_fetch(keys, values)
    assert plain.nbytes == 2 * 4 * 256 * 64 * 2
    # real bytes held: 256 tokens fill exactly one step of the preallocated buffers
    assert quantized.nbytes == sum(a.nbytes for a in quantized.state)
    assert quantized.nbytes == 2 * 4 * 256 * (64 * 4 // 8 + 2 * 2)  # packed + fp16 scale, bias
    assert quantized.nbytes / plain.nbytes <= 0.30


@pytest.mark.parametrize("options,message", [
    (dict(bits=7), r"bits must be one of \(2, 3, 4, 5, 6, 8\), got 7"),
    (dict(bits=1), r"bits must be one of"),
    (dict(bits="4"), r"bits must be one of"),
    (dict(bits=4.0), r"bits must be one of"),
    (dict(group_size=12), r"group_size must be one of \(4, 8, 16, 32, 64, 128\), got 12"),
    (dict(group_size=48), r"group_size must be one of"),
    (dict(key_bits=9), r"key_bits must be one of"),
    (dict(value_bits=0), r"value_bits must be one of"),
    (dict(group_size=64), r"group_size 64 does not divide the head size 32.*fit this model: 4, 8, 16, 32"),
    (dict(group_size=128), r"group_size 128 does not divide the head size 32"),
])
def test_bad_options_are_clear_errors_at_construction(options, message):
    model = zoo.build("llama", preset="tiny")  # head size 32
    with pytest.raises(ValueError, match=message):
        caches.make("quantized", model, **options)


def test_head_size_no_group_fits_and_direct_use_is_checked():
    model = zoo.build("llama", preset="tiny", head_dim=8)
    with pytest.raises(ValueError, match="head size 8.*fit this model: 4, 8"):
        caches.make("quantized", model, group_size=32)
    assert {ex["group_size"] for ex in caches.examples("quantized", head_dim=8, seq_len=10)} <= {4, 8}
    model = zoo.build("llama", preset="tiny", head_dim=6)
    with pytest.raises(ValueError, match="head size 6.*none"):
        caches.make("quantized", model, group_size=4)
    assert caches.examples("quantized", head_dim=6, seq_len=10) == []
    assert all(64 % ex["group_size"] == 0
               for ex in caches.examples("quantized", head_dim=64, seq_len=10))
    cache = QuantizedCache(bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size 64 does not divide the head size 96"):
        cache.update_and_fetch(mx.zeros((1, 1, 2, 96)), mx.zeros((1, 1, 2, 96)))
    with pytest.raises(TypeError, match="float"):
        cache.update_and_fetch(mx.zeros((1, 1, 2, 64), mx.int32), mx.zeros((1, 1, 2, 64), mx.int32))
    assert cache.offset == 0 and cache.state == ()


def test_reference_rounds_each_token_independently():
    """The oracle's rounding must not depend on which tokens share a forward pass."""
    ref = QuantizedReference(bits=3, group_size=32)
    x = mx.random.normal((1, 2, 9, 64), key=mx.random.key(11))
    whole, _ = ref.transform_kv(x, x)
    parts = mx.concatenate([ref.transform_kv(x[:, :, i : i + 1], x)[0] for i in range(9)], axis=2)
    assert mx.array_equal(whole, parts).item()


# -- the widths the user asked for are the widths stored (three independent views) -----------

MIXED = dict(group_size=32, key_bits=8, value_bits=3)


def test_mixed_widths_match_a_reference_built_from_the_request_itself():
    """The oracle is built from the options asked for, not from what the cache says it is: a
    cache that stored values at the key width would match its own reference, not this one."""
    model = zoo.build("llama", preset="tiny", seed=6)
    tokens = tokens_of(16)
    requested = QuantizedReference(bits=MIXED["key_bits"], group_size=32, key_bits=8, value_bits=3)
    cache = caches.make("quantized", model, **MIXED)
    got = feed(model, cache, tokens, [5, 1, 10])
    stored = QuantizedReference(bits=8, group_size=32, key_bits=8, value_bits=8)
    want, wrong = oracle(model, tokens, requested), oracle(model, tokens, stored)
    assert mx.abs(want - wrong).max().item() > 1e-2  # 3-bit values really differ from 8-bit ones
    assert mx.abs(got - want).max().item() <= TOL


def test_mixed_widths_take_the_bytes_of_the_widths_asked_for():
    """Packed bytes per token from the formula: D * bits / 8 plus a scale and a bias per group."""
    keys = mx.random.normal((1, 2, 256, 64), key=mx.random.key(1))
    values = mx.random.normal((1, 2, 256, 64), key=mx.random.key(2))
    cache = QuantizedCache(**MIXED)
    cache.update_and_fetch(keys, values)
    per_group = 2 * 4  # float32 scale and bias
    want = 2 * 256 * ((64 * 8 // 8 + 2 * per_group) + (64 * 3 // 8 + 2 * per_group))
    assert cache.nbytes == want


def test_mixed_widths_are_what_a_saved_cache_says_and_reloads(tmp_path):
    model = zoo.build("llama", preset="tiny", seed=6)
    cache = caches.make("quantized", model, **MIXED)
    feed(model, cache, tokens_of(6), [6])
    caches.save(tmp_path / "mixed.safetensors", cache)
    loaded, _ = caches.load(tmp_path / "mixed.safetensors")
    assert {k: loaded[0].options()[k] for k in MIXED} == MIXED
    assert (loaded[0].key_bits, loaded[0].value_bits) == (8, 3)


def test_a_state_saved_at_other_value_bits_is_refused():
    """Values packed at 6 bits, loaded with metadata naming another value width: refused with
    the widths named. With the layout (the head sizes) every other width is refused; without
    it, every width whose packing cannot be 6-bit values of 64 features in groups of 64 (4 bits
    packs 96 features in the same words and one group: indistinguishable without the layout)."""
    keys = mx.random.normal((1, 2, 4, 64), key=mx.random.key(3))
    saved = QuantizedCache(key_bits=8, value_bits=6, group_size=64)
    saved.update_and_fetch(keys, keys)
    meta, options = saved.meta_state, json.loads(saved.meta_state["options"])
    assert json.loads(meta["layout"])[2:4] == [64, 64]
    for value_bits in (2, 3, 4, 5, 8):
        wrong = {**meta, "options": json.dumps({**options, "value_bits": value_bits})}
        without_layout = {k: v for k, v in wrong.items() if k != "layout"}
        for bad in (wrong, without_layout) if value_bits != 4 else (wrong,):
            with pytest.raises(ValueError, match=f"bits 8/{value_bits}"):
                QuantizedCache.from_state(saved.state, bad)
    loaded = QuantizedCache.from_state(saved.state, meta)
    assert (loaded.offset, loaded.value_bits) == (4, 6)


def test_a_reference_that_does_not_round_demands_equality():
    """Reference.rounding_flips for the exact reference: no flips ever, and any stored value
    that is not the computed one is a problem, however close."""
    keys = mx.random.normal((1, 2, 5, 8), key=mx.random.key(4))
    values = mx.random.normal((1, 2, 5, 8), key=mx.random.key(5))
    assert caches.EXACT.rounding_flips((keys, values), (mx.array(keys), mx.array(values))) == (0, None)
    nudged = mx.array(values)
    nudged[0, 1, 3, 2] = nudged[0, 1, 3, 2] + 1e-6
    for stored in ((keys, nudged), (nudged, values), (values, keys)):
        flips, problem = caches.EXACT.rounding_flips((keys, values), stored)
        assert flips == 0 and "not the reference's" in problem


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_narrow_group_steps_are_mx_quantizes_scales_for_the_same_values(bits):
    """Groups of 8 (kvzoo's own packing): the rounding step of each value is the scale
    mx.quantize gives its group's values repeated to a group of 32 (same minimum and maximum)."""
    x = mx.random.normal((1, 2, 3, 16), key=mx.random.key(6))  # [B, H, L, D]: two groups of 8
    k_step, v_step = QuantizedReference(bits, 8).rounding_step(x, 2 * x)
    tiled = mx.tile(x.reshape(6, 2, 8), (1, 1, 4)).reshape(12, 32)
    _, scales, _ = mx.quantize(tiled, group_size=32, bits=bits)
    want = mx.repeat(mx.abs(scales).reshape(6, 2, 1), 8, axis=-1).reshape(x.shape)
    assert mx.allclose(k_step, want, rtol=1e-6, atol=0).item()
    assert mx.allclose(v_step, 2 * want, rtol=1e-6, atol=0).item()
