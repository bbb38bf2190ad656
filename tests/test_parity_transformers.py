"""Parity with HF transformers on identical weights (fp32): checkpoints written by
`save_pretrained` load into kvzoo with logits within 1e-4 of transformers' and the same greedy
tokens with every exact cache; `zoo.save` writes folders transformers reads back.

transformers' models are the oracle: nobody here wrote them. Weights are drawn large enough
that logits spread over several units, so a wrong layout or pairing cannot hide under 1e-4.
"""

from __future__ import annotations

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

CASES = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-untied": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False)),
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
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}


def hf_model(case: str):
    """A transformers model of `case` with random weights of unit-scale logits."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    family, fields = CASES[case]
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, **fields))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, **fields))
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
    assert tied == fields.get("tie_word_embeddings", family == "gpt2")
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
    cls = transformers.GPT2LMHeadModel if case.startswith("gpt2") else transformers.LlamaForCausalLM
    reread = cls.from_pretrained(tmp_path / "saved").eval()
    np.testing.assert_allclose(hf_logits(reread, BATCH), hf_logits(hf, BATCH), atol=LOGIT_TOL, rtol=0)


def test_zoo_models_saved_for_transformers(tmp_path):
    """Models built in kvzoo (never seen by transformers) run the same in transformers."""
    transformers = require_module("transformers")
    for family, overrides in [("gpt2", dict(d_ff=96)), ("llama", dict(n_kv_heads=2, rope_base=500.0, rope_scale=0.25))]:
        model = zoo.build(family, vocab_size=VOCAB, d_model=24, n_layers=3, n_heads=6, max_positions=64,
                          init_std=0.3, **overrides)
        zoo.save(model, tmp_path / family)
        cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
        reread = cls.from_pretrained(tmp_path / family).eval()
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
