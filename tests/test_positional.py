"""Positional schemes against implementations nobody here wrote."""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import positional
from helpers.assets import require_module
from positional.alibi import ALiBi, alibi_slopes
from positional.learned import LearnedPositional
from positional.rope import RoPE
import zoo


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32])
def test_alibi_slopes_match_mlx_nn(n_heads):
    want = nn.ALiBi.create_alibi_slope(n_heads).reshape(-1)
    assert np.allclose(alibi_slopes(n_heads), np.array(want), rtol=1e-6)


def test_alibi_slopes_for_eight_heads_are_the_papers():
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]


@pytest.mark.parametrize("n_heads", [4, 6, 12])
def test_alibi_bias_matches_bloom_after_softmax(n_heads):
    """BLOOM adds slope * key_position; ALiBi's -slope * distance differs by a per-row
    constant, so the attention probabilities must be identical."""
    torch = require_module("torch")
    require_module("transformers")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    L = 9
    bloom = build_alibi_tensor(torch.ones(1, L), n_heads, torch.float32).numpy().reshape(n_heads, 1, L)
    pos = mx.arange(L)
    ours = np.array(ALiBi(n_heads).bias(pos, pos))  # [H, L, L]
    causal = np.tril(np.ones((L, L), dtype=bool))
    scores = np.random.default_rng(0).normal(size=(n_heads, L, L))

    def softmax(bias):
        x = np.where(causal, scores + bias, -np.inf)
        x = np.exp(x - x.max(-1, keepdims=True))
        return x / x.sum(-1, keepdims=True)

    assert np.allclose(softmax(ours), softmax(bloom), atol=1e-6)


def test_a_built_models_alibi_slopes_are_the_papers_for_eight_heads():
    """Press et al. (2022), section 3: with 8 heads the slopes are 1/2, 1/4, ..., 1/256, head h
    getting 2^-(h+1). Read off the bias the model itself applies, one key one step back."""
    model = zoo.build("llama", preset="tiny", positional="alibi", n_heads=8, n_kv_heads=8, d_model=64)
    bias = np.array(model.positional.bias(mx.array([1]), mx.array([0])))  # [H, 1, 1]
    assert np.array_equal(bias[:, 0, 0], -np.array([2.0 ** -(h + 1) for h in range(8)], dtype=np.float32))


@pytest.mark.parametrize("n_heads", [2, 4, 8, 16])
def test_alibi_bias_matches_mpt_for_the_last_query(n_heads):
    """MPT (transformers' build_mpt_alibi_tensor) writes slope_h * (k - (L-1)): for the last
    query that is exactly -slope_h * distance, head by head (powers of two, where MPT's and
    BLOOM's head order agree with the paper)."""
    require_module("torch")
    require_module("transformers")
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    L = 7
    mpt = build_mpt_alibi_tensor(n_heads, L).numpy().reshape(n_heads, L)  # [H, L] for the last query
    pos = mx.arange(L)
    ours = np.array(ALiBi(n_heads).bias(pos[-1:], pos))[:, 0, :]  # [H, L]
    assert np.allclose(ours, mpt, atol=1e-6)


def test_alibi_bias_depends_on_absolute_positions_not_slot_order():
    scheme = ALiBi(4)
    q = mx.array([10])
    k_in_order, k_shuffled = mx.array([7, 8, 9, 10]), mx.array([9, 10, 7, 8])
    a = np.array(scheme.bias(q, k_in_order))
    b = np.array(scheme.bias(q, k_shuffled))
    assert np.array_equal(a[..., [2, 3, 0, 1]], b)


def numpy_rope(x: np.ndarray, positions: np.ndarray, base: float, traditional: bool, scale: float):
    """RoPE written from the paper's formula: rotate feature pairs by angle pos * base^(-2i/D)."""
    D = x.shape[-1]
    inv_freq = base ** (-np.arange(0, D, 2) / D)  # [D/2]
    angles = (positions * scale)[:, None] * inv_freq[None, :]  # [L, D/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if traditional:  # pairs (x0, x1), (x2, x3), ...
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : D // 2], x[..., D // 2 :]  # pairs (x_i, x_{i + D/2})
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("offset, scale, base", [(0, 1.0, 10000.0), (37, 1.0, 10000.0),
                                                 (5, 0.25, 500000.0)])
def test_rope_matches_the_formula_at_absolute_positions(traditional, offset, scale, base):
    x = np.random.default_rng(1).normal(size=(1, 2, 6, 16)).astype(np.float32)
    rope = RoPE(16, base=base, traditional=traditional, scale=scale)
    positions = mx.arange(offset, offset + 6)
    q, _ = rope.rotate(mx.array(x), mx.array(x), positions)
    want = numpy_rope(x.astype(np.float64), np.arange(offset, offset + 6), base, traditional, scale)
    assert np.allclose(np.array(q), want, atol=2e-5)


def test_rope_matches_hf_llama_rotary_embedding():
    torch = require_module("torch")
    require_module("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    D, L, offset = 16, 5, 11
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=D, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(1, 4, L, D)
    position_ids = torch.arange(offset, offset + L)[None]
    cos, sin = rotary(x, position_ids)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got, _ = RoPE(D).rotate(mx.array(x.numpy()), mx.array(x.numpy()), mx.arange(offset, offset + L))
    assert np.allclose(np.array(got), want.numpy(), atol=1e-5)


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("offset", [0, 300])
def test_llama3_rope_matches_hf_llama_rotary_embedding(offset):
    torch = require_module("torch")
    require_module("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    D, L = 32, 6  # 16 pairs: wavelengths 6.3 .. 35000 span the kept, smoothed and scaled bands
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=D, rope_theta=10000.0,
                         max_position_embeddings=1024, rope_scaling={"rope_type": "llama3", **LLAMA3})
    x = torch.randn(1, 4, L, D, generator=torch.Generator().manual_seed(offset))
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(offset, offset + L)[None])
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    positions = mx.arange(offset, offset + L)
    got, _ = RoPE(D, llama3=LLAMA3).rotate(mx.array(x.numpy()), mx.array(x.numpy()), positions)
    assert np.allclose(np.array(got), want.numpy(), atol=1e-4)  # fp32 angles near 300 rad: ~3e-5
    plain, _ = RoPE(D).rotate(mx.array(x.numpy()), mx.array(x.numpy()), positions)
    if offset:  # the scaling matters: unscaled RoPE is far off
        assert np.abs(np.array(plain) - want.numpy()).max() > 0.1


@pytest.mark.parametrize("change, message", [
    ({"factor": 0}, "factor must be a positive number"),
    ({"low_freq_factor": 4.0}, "low_freq_factor < high_freq_factor"),
    ({"original_max_position_embeddings": 8.5}, "whole number"),
    ({"beta_fast": 32}, "unexpected \\['beta_fast'\\]"),
    ({"factor": None}, "factor must be a positive number"),
])
def test_llama3_rope_options_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        RoPE(16, llama3={**LLAMA3, **change})
    with pytest.raises(ValueError, match="missing \\['factor'\\]"):
        RoPE(16, llama3={k: v for k, v in LLAMA3.items() if k != "factor"})


@pytest.mark.parametrize("given", ["llama3", 8.0, [("factor", 8.0)]])
def test_llama3_rope_scaling_that_is_no_dict_names_the_fields(given):
    with pytest.raises(TypeError, match="must be a dict with factor, low_freq_factor, "
                                        "high_freq_factor, original_max_position_embeddings"):
        RoPE(16, llama3=given)


def test_llama3_scaling_lives_in_the_config_and_needs_rope():
    model = zoo.build("llama", preset="tiny", rope_scaling=LLAMA3)
    assert model.config.rope_scaling == LLAMA3
    assert not any("freq" in name for name, _ in tree_flatten(model.parameters()))  # derived, not a weight
    with pytest.raises(ValueError, match="needs positional='rope'"):
        zoo.build("llama", preset="tiny", positional="alibi", rope_scaling=LLAMA3)


def test_learned_adds_the_row_of_each_absolute_position():
    table = LearnedPositional(8, 4)
    table.weight = mx.arange(32, dtype=mx.float32).reshape(8, 4)
    h = mx.zeros((2, 3, 4))
    out = table.embed(h, mx.arange(5, 8))
    assert np.array_equal(np.array(out[1]), np.array(table.weight[5:8]))


def test_learned_bounds_name_the_limit():
    table = LearnedPositional(8, 4)
    table.check_positions(5, 3)  # positions 5..7 fit
    with pytest.raises(ValueError, match=r"position 8 is past the learned position table of 8"):
        table.check_positions(6, 3)


def test_schemes_without_a_table_have_no_limit():
    for name in ("rope", "alibi"):
        assert positional.get(name).max_positions is None


def test_a_registered_scheme_becomes_available():
    @positional.register("test-nope")
    class NoPositions(positional.Positional):
        @classmethod
        def from_config(cls, config):
            return cls()

    try:
        assert "test-nope" in positional.available()
        import zoo

        model = zoo.build("llama", preset="tiny", positional="test-nope")
        assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 96)
    finally:
        from positional import registry

        registry.SCHEMES.remove("test-nope")


def test_learned_positions_of_left_padding_read_the_first_row_of_the_table():
    """A ragged batch gives padding slots negative positions: they read row 0 of the table (a
    valid row; attention never sees them), never row -1 from the end; real slots read their own."""
    learned = LearnedPositional(8, 4)
    learned.weight = mx.arange(32, dtype=mx.float32).reshape(8, 4)  # row p = 4p .. 4p+3
    positions = mx.array([[-2, -1, 0, 1], [0, 1, 2, 3]])  # [B, L]: row 0 has two padding slots
    out = np.array(learned.embed(mx.zeros((2, 4, 4)), positions))  # [B, L, d]
    table = np.arange(32, dtype=np.float32).reshape(8, 4)
    assert np.array_equal(out[0], table[[0, 0, 0, 1]])
    assert np.array_equal(out[1], table[[0, 1, 2, 3]])


@pytest.mark.parametrize("options, message", [
    ({"dims": 3}, r"even number of rotated dims >= 2, got 3"),
    ({"dims": 0}, r"even number of rotated dims >= 2, got 0"),
    ({"dims": 8, "base": 0}, r"base and scale must be positive, got base=0, scale=1.0"),
    ({"dims": 8, "scale": -1.0}, r"base and scale must be positive, got base=10000.0, scale=-1.0"),
])
def test_bad_rope_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        RoPE(**options)
