"""Parity with HF transformers on identical weights (fp32): checkpoints written by
`save_pretrained` load into kvzoo with logits within 1e-4 of transformers' and the same greedy
tokens with every exact cache; `zoo.save` writes folders transformers reads back.

transformers' models are the oracle: nobody here wrote them. Weights are drawn large enough
that logits spread over several units, so a wrong layout or pairing cannot hide under 1e-4.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers.checkpoint_oracles import (LOGIT_TOL, assert_greedy_agrees, exact_caches, greedy_cached,
                                log_softmax, spread)
from helpers.assets import require_module

import zoo

VOCAB = 96
BATCH = np.random.RandomState(1).randint(0, VOCAB, (3, 20))
PROMPT = [5, 17, 42, 3, 88, 61, 9, 30]
NEW_TOKENS = 24

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# case -> (HF model_type, config fields): small versions of real checkpoints' configs.
CASES = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-untied": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False)),
    # nanoGPT / minGPT-style checkpoints: exact-erf GELU; and a ReLU GPT-2.
    "gpt2-exact-gelu": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, activation_function="gelu")),
    "gpt2-relu": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, activation_function="relu")),
    "llama-gqa": ("llama", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    "llama-mqa-tied-bias-scaled": ("llama", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, max_position_embeddings=128)),
    # Llama 3.1+ RoPE: with a 32-token original context, the 8 frequency pairs of a 16-wide head
    # fall in all three bands (kept, interpolated, divided by the factor).
    "llama-llama3-rope": ("llama", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_scaling=LLAMA3_ROPE)),
    # Llama 2 (7B: MHA, untied, theta 1e4, eps 1e-5); TinyLlama (GQA 32/4, untied, Llama 2 rope);
    # SmolLM (135M: 9 heads / 3 kv heads, tied); Llama 3 (theta 5e5, GQA); Llama 3.2 (1B: tied,
    # head_dim 64 set explicitly, llama3 rope factor 32).
    "llama2": ("llama", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                             max_position_embeddings=128)),
    "tinyllama": ("llama", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=128)),
    "smollm": ("llama", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                             num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                             max_position_embeddings=128)),
    "llama3": ("llama", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=128)),
    "llama3.2": ("llama", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=500000.0,
                               rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=128)),
    # Qwen2.5 (0.5B: q/k/v biases, tied, theta 1e6, sliding window configured but unused) and an
    # untied Qwen2; Mistral v0.1 (a sliding window, short here so the 32 tokens cross it) and
    # v0.3 / Nemo style (no window, head_dim set apart from hidden_size / heads).
    "qwen2.5": ("qwen2", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
                              use_sliding_window=False, sliding_window=32, max_window_layers=2,
                              max_position_embeddings=128)),
    "qwen2-untied": ("qwen2", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=128)),
    "mistral-window": ("mistral", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                       max_position_embeddings=128)),
    "mistral-v0.3": ("mistral", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                                     rope_theta=1000000.0, max_position_embeddings=128)),
}


def hf_model(case: str):
    """A transformers model of `case` with random weights of unit-scale logits."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    model_type, fields = CASES[case]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(sorted(CASES).index(case))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == fields.get("tie_word_embeddings", model_type == "gpt2")
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens (HF's own KV cache via generate) and its logits at each step."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             eos_token_id=None)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (transformers model, folder written by save_pretrained)."""
    made = {}

    def get(case):
        if case not in made:
            model = hf_model(case)
            folder = tmp_path_factory.mktemp(case)
            model.save_pretrained(folder, safe_serialization=True)
            assert (folder / "model.safetensors").exists()
            made[case] = (model, folder)
        return made[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(checkpoints, case):
    hf, folder = checkpoints(case)
    ours = zoo.load_model(folder)
    expected = hf_logits(hf, BATCH)
    assert spread(expected) > 1.0, "weights too small for a meaningful comparison"
    np.testing.assert_allclose(np.array(ours(mx.array(BATCH))), expected, atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("cache", exact_caches())
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_match_transformers_with_every_exact_cache(checkpoints, case, cache):
    hf, folder = checkpoints(case)
    model = zoo.load_model(folder)
    expected_tokens, expected_logits = hf_greedy(hf, PROMPT, NEW_TOKENS)
    tokens, logprobs = greedy_cached(model, PROMPT, NEW_TOKENS, cache, prefill_step=3)
    assert_greedy_agrees(tokens, expected_tokens, expected_logits)
    np.testing.assert_allclose(logprobs, log_softmax(expected_logits), atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zoo_save_is_read_by_transformers(checkpoints, case, tmp_path):
    transformers = require_module("transformers")
    hf, folder = checkpoints(case)
    zoo.save(zoo.load_model(folder), tmp_path / "saved")
    # A Mistral without a window is a Llama: saved as one (transformers computes the same).
    saved_as = "llama" if case == "mistral-v0.3" else CASES[case][0]
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == saved_as
    reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    np.testing.assert_allclose(hf_logits(reread, BATCH), hf_logits(hf, BATCH), atol=LOGIT_TOL, rtol=0)


def test_zoo_models_saved_for_transformers(tmp_path):
    """Models built in kvzoo (never seen by transformers) run the same in transformers."""
    transformers = require_module("transformers")
    for family, overrides in [("gpt2", dict(d_ff=96)), ("llama", dict(n_kv_heads=2, rope_base=500.0, rope_scale=0.25))]:
        model = zoo.build(family, vocab_size=VOCAB, d_model=24, n_layers=3, n_heads=6, max_positions=64,
                          init_std=0.3, **overrides)
        zoo.save(model, tmp_path / family)
        reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        expected = hf_logits(reread, BATCH)
        assert spread(expected) > 1.0
        np.testing.assert_allclose(np.array(model(mx.array(BATCH))), expected, atol=LOGIT_TOL, rtol=0)


def test_gguf_converted_from_a_transformers_llama(checkpoints, tmp_path):
    """llama.cpp's conversion (q/k rows permuted, GGUF names) of a transformers model loads
    into kvzoo with transformers' logits: the RoPE pairing is handled."""
    from test_loading import write_gguf_like_llama_cpp

    hf, folder = checkpoints("llama-gqa")
    write_gguf_like_llama_cpp(tmp_path / "m.gguf", zoo.load_model(folder))
    ours = zoo.load_model(tmp_path / "m.gguf")
    assert ours.config.rope_traditional
    np.testing.assert_allclose(np.array(ours(mx.array(BATCH))), hf_logits(hf, BATCH), atol=LOGIT_TOL, rtol=0)


def test_mistral_window_is_read_and_matters(checkpoints):
    """The window is part of the model: kvzoo's config carries it, and without it the logits
    past the window differ (so the parity above is not the window-free model's)."""
    hf, folder = checkpoints("mistral-window")
    model = zoo.load_model(folder)
    assert model.config.sliding_window == 6
    unwindowed = zoo.from_config(model.config.replace(sliding_window=None))
    unwindowed.update(model.parameters())
    expected = hf_logits(hf, BATCH)
    assert np.abs(np.array(unwindowed(mx.array(BATCH)))[:, 6:] - expected[:, 6:]).max() > 1e-2


@pytest.mark.parametrize("case", ["mistral-window"])
def test_greedy_tokens_match_transformers_with_the_default_rotating_cache(checkpoints, case):
    hf, folder = checkpoints(case)
    model = zoo.load_model(folder)
    expected_tokens, expected_logits = hf_greedy(hf, PROMPT, NEW_TOKENS)
    tokens, logprobs = greedy_cached(model, PROMPT, NEW_TOKENS, None, prefill_step=5)
    assert_greedy_agrees(tokens, expected_tokens, expected_logits)
    np.testing.assert_allclose(logprobs, log_softmax(expected_logits), atol=LOGIT_TOL, rtol=0)


def test_qwen2_with_a_window_on_some_layers_is_refused_by_name(checkpoints, tmp_path):
    _, folder = checkpoints("qwen2.5")
    config = json.loads((folder / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="sliding window on some layers only"):
        zoo.load_model(tmp_path)


def test_gpt2_config_fields_mean_what_transformers_makes_of_them():
    """Config conversion against transformers' own GPT2Config (gaps a model-path mutation sample
    found): a config.json without `tie_word_embeddings` is tied, as GPT2Config's default is; a
    non-default LayerNorm epsilon survives the export to config.json."""
    require_module("transformers")
    from transformers import GPT2Config

    from zoo.families.gpt2 import config_from_hf, hf_config

    minimal = {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
    assert config_from_hf(minimal).tie_embeddings == GPT2Config(**minimal).tie_word_embeddings
    cfg = zoo.build("gpt2", preset="tiny", head_dim=16, norm_eps=1e-6).config
    assert GPT2Config(**hf_config(cfg)).layer_norm_epsilon == 1e-6


@pytest.mark.parametrize("factor", [0, -2.0, "2"])
def test_linear_rope_scaling_needs_a_positive_factor(factor):
    from zoo.families.llama import config_from_hf

    hf = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "rms_norm_eps": 1e-5, "rope_scaling": {"type": "linear", "factor": factor}}
    with pytest.raises(ValueError, match="linear rope scaling needs a positive 'factor'"):
        config_from_hf(hf)
