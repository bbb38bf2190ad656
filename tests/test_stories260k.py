"""The real trained model: Karpathy's stories260K (llama2.c, converted to GGUF by llama.cpp).

Oracles nobody here wrote: the trained weights themselves (a human-written story must be
likely under them, and much less likely with the other RoPE pairing), sentencepiece's
tokenizer (tok512.model), mlx-lm's llama on the same tensors, and HF transformers on the
folder `zoo.save` writes. Every exact cache must give the same greedy tokens, and every
approximate cache must match the uncached model under its declared reference.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from helpers.checkpoint_oracles import (LOGIT_TOL, approximate_caches, assert_greedy_agrees, exact_caches,
                                greedy_cached, greedy_uncached, log_softmax)
from helpers.assets import require_asset, require_module

import caches
import zoo

OPENING = "Once upon a time"
NEW_TOKENS = 100
# Written for this test in the style of TinyStories (not produced by any model).
STORY = ("Once upon a time, there was a little boy named Tom. He liked to play with his red ball in "
         "the garden. One day, the ball rolled under a big tree. Tom was sad. His mom came and helped "
         "him find the ball. Tom was happy again and said thank you to his mom.")


@pytest.fixture(scope="module")
def gguf_path():
    return require_asset("stories260K/stories260K.gguf")


@pytest.fixture(scope="module")
def model(gguf_path):
    return zoo.load_model(gguf_path)


@pytest.fixture(scope="module")
def sp():
    spm = require_module("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(require_asset("stories260K/tok512.model")))


@pytest.fixture(scope="module")
def prompt(sp):
    return [1] + sp.encode(OPENING)  # BOS = 1


@pytest.fixture(scope="module")
def greedy(model, prompt):
    """The uncached greedy continuation: tokens and the logits [N, V] that chose them."""
    return greedy_uncached(model, prompt, NEW_TOKENS)


def perplexity(model, tokens: list[int]) -> float:
    x = mx.array([tokens])
    logits = model(x[:, :-1])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return math.exp(-mx.take_along_axis(logprobs[0], x[0, 1:, None], axis=-1).mean().item())


def with_rope_pairing(model, traditional: bool):
    other = zoo.from_config(model.config.replace(rope_traditional=traditional))
    other.update(model.parameters())
    return other


def test_loads_with_the_documented_shape(model, gguf_path):
    cfg = model.config
    assert (cfg.family, cfg.vocab_size, cfg.d_model, cfg.n_layers) == ("llama", 512, 64, 5)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (8, 4, 8, 172)
    assert cfg.positional == "rope" and cfg.rope_traditional and cfg.rope_base == 10000.0
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.max_positions == 2048
    assert cfg.tie_embeddings  # output.weight equals token_embd.weight in this file
    weights = mx.load(str(gguf_path))
    np.testing.assert_array_equal(np.array(model.model.embed_tokens.weight), np.array(weights["token_embd.weight"]))


def test_a_human_written_story_is_likely_and_needs_llama_cpp_rope_pairing(model, sp):
    tokens = [1] + sp.encode(STORY)
    right = perplexity(model, tokens)
    wrong = perplexity(with_rope_pairing(model, traditional=False), tokens)
    assert right < 5.0, f"perplexity {right:.2f} on a simple story (uniform guessing: 512)"
    assert wrong > 4 * right, f"HF pairing {wrong:.2f} vs llama.cpp pairing {right:.2f}"


def test_greedy_story_depends_on_the_rope_pairing(model, prompt, greedy):
    tokens, _ = greedy
    wrong, _ = greedy_uncached(with_rope_pairing(model, traditional=False), prompt, 20)
    assert wrong != tokens[:20]
    assert perplexity(model, prompt + wrong) > 10 * perplexity(model, prompt + tokens[:20])


def mlx_lm_llama_from_gguf(gguf_path):
    """mlx-lm's llama built from the GGUF tensors with this test's own reading of the file."""
    from mlx_lm.models import llama

    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    n_layers = meta["llama.block_count"].item()
    args = llama.ModelArgs(
        model_type="llama", hidden_size=meta["llama.embedding_length"].item(), num_hidden_layers=n_layers,
        intermediate_size=meta["llama.feed_forward_length"].item(),
        num_attention_heads=meta["llama.attention.head_count"].item(),
        num_key_value_heads=meta["llama.attention.head_count_kv"].item(),
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"].item(),
        vocab_size=weights["token_embd.weight"].shape[0], rope_theta=10000.0,
        rope_traditional=True, tie_word_embeddings=False)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(n_layers):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in parts.items()})
    twin = llama.Model(args)
    twin.load_weights([(names[k], v) for k, v in weights.items()], strict=True)
    return twin


def test_mlx_lm_llama_on_the_same_weights_gives_the_same_greedy_story(gguf_path, model, prompt, greedy, sp):
    from test_parity_mlx_lm import mlx_lm_greedy

    tokens, logits = greedy
    theirs, their_logprobs = mlx_lm_greedy(mlx_lm_llama_from_gguf(gguf_path), prompt, NEW_TOKENS)
    assert_greedy_agrees(tokens, theirs, their_logprobs)
    np.testing.assert_allclose(log_softmax(logits), their_logprobs, atol=LOGIT_TOL, rtol=0)
    text = sp.decode(tokens)
    assert len(text.split()) > 40  # a story, not a loop of one piece


@pytest.mark.parametrize("cache", exact_caches())
def test_every_exact_cache_gives_the_uncached_greedy_story(model, prompt, greedy, cache):
    tokens, logits = greedy
    for prefill_step in (1, 3, 512):
        ours, logprobs = greedy_cached(model, prompt, NEW_TOKENS, cache, prefill_step=prefill_step)
        assert_greedy_agrees(ours, tokens, logits)
        np.testing.assert_allclose(logprobs, log_softmax(logits), atol=LOGIT_TOL, rtol=0)


def approximate_cases():
    seq_len = 5 + NEW_TOKENS  # BOS + "Once upon a time" is 5 tokens
    return [pytest.param(name, options, id=name + "-" + ",".join(f"{k}={v}" for k, v in options.items()))
            for name in approximate_caches()
            for options in caches.examples(name, head_dim=8, seq_len=seq_len)]


@pytest.mark.parametrize("cache,options", approximate_cases())
def test_approximate_caches_match_the_uncached_model_under_their_reference(model, prompt, cache, options):
    layer_caches = caches.make(cache, model, **options)
    ours, logprobs = greedy_cached(model, prompt, NEW_TOKENS, layer_caches, prefill_step=3)
    reference = layer_caches[0].reference  # after the run: an eviction cache's is its record
    expected, expected_logits = greedy_uncached(model, prompt, NEW_TOKENS, reference=reference)
    assert_greedy_agrees(ours, expected, expected_logits)
    agree = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), len(ours))
    np.testing.assert_allclose(logprobs[:agree], log_softmax(expected_logits)[:agree], atol=LOGIT_TOL, rtol=0)


def test_saved_folder_runs_the_same_in_transformers_and_mlx_lm(model, prompt, greedy, tmp_path):
    """zoo.save writes llama.cpp's q/k rows back in HF's order; transformers (HF pairing) then
    computes the same logits as kvzoo on the GGUF (llama.cpp pairing)."""
    from test_parity_mlx_lm import mlx_lm_greedy, mlx_lm_load

    tokens, logits = greedy
    zoo.save(model, tmp_path / "stories")
    theirs, their_logprobs = mlx_lm_greedy(mlx_lm_load(tmp_path / "stories"), prompt, NEW_TOKENS)
    assert_greedy_agrees(tokens, theirs, their_logprobs)

    torch = require_module("torch")
    transformers = require_module("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "stories").eval()
    sequence = prompt + tokens
    with torch.no_grad():
        expected = hf(torch.tensor([sequence])).logits[0].float().numpy()
    np.testing.assert_allclose(np.array(model(mx.array([sequence]))[0]), expected, atol=LOGIT_TOL, rtol=0)
