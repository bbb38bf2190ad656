"""Parity with mlx-lm on identical weights: folders that mlx-lm's own loader reads
(`mlx_lm.utils.load_model`) give the same logits in kvzoo, and mlx-lm's generation loop with
its own caches picks the same greedy tokens as kvzoo uncached and with every exact cache.

mlx-lm's model code, loader and caches are the oracle; kvzoo only wrote the folder (in HF's
documented layout, which mlx-lm's loader sanitizes its own way).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers.checkpoint_oracles import (LOGIT_TOL, assert_greedy_agrees, exact_caches, greedy_cached,
                                greedy_uncached, spread)
from helpers.assets import require_module

import zoo
from mlx.utils import tree_flatten, tree_unflatten

VOCAB = 96
BATCH = mx.array(np.random.RandomState(2).randint(0, VOCAB, (3, 20)))
PROMPT = [7, 1, 64, 33, 12, 90, 45, 2]
NEW_TOKENS = 24

SHAPE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_positions=128, init_std=0.3)
CASES = {
    "gpt2": ("gpt2", dict(d_ff=128)),
    "llama-gqa": ("llama", dict(n_kv_heads=2, d_ff=48, tie_embeddings=False)),
    "llama-mqa-tied-bias-scaled": ("llama", dict(n_kv_heads=1, d_ff=48, head_dim=16, qkv_bias=True, out_bias=True,
                                                 mlp_bias=True, rope_base=5000.0, rope_scale=0.5)),
    # Qwen2: q/k/v biases only (mlx-lm's qwen2 model), tied as Qwen2.5-0.5B.
    "qwen2": ("llama", dict(n_kv_heads=2, d_ff=48, qkv_bias=True, out_bias=False, tie_embeddings=True,
                            rope_base=1e6)),
    "llama-traditional-rope": ("llama", dict(n_kv_heads=2, d_ff=48, rope_traditional=True)),
    "llama-llama3-rope": ("llama", dict(n_kv_heads=2, d_ff=48, head_dim=16, rope_scaling=dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
}


def mlx_lm_load(folder: Path):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    return model


def mlx_lm_greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """mlx-lm's generation loop and caches, argmax sampling: tokens and log-probs [n, V]."""
    from mlx_lm.generate import generate_step

    out = list(generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)))
    return [int(t) for t, _ in out], np.stack([np.array(lp).reshape(-1) for _, lp in out])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (kvzoo model, folder written by zoo.save)."""
    made = {}

    def get(case):
        if case not in made:
            family, overrides = CASES[case]
            model = zoo.build(family, seed=len(made), **{**SHAPE, **overrides})
            # Biases start at zero; draw them, so a bias in the wrong place shows.
            rng = np.random.RandomState(len(made))
            model.update(tree_unflatten([(n, mx.array(0.1 * rng.randn(*v.shape).astype(np.float32)))
                                         for n, v in tree_flatten(model.parameters()) if n.endswith(".bias")
                                         and "norm" not in n and ".ln_" not in n]))
            folder = tmp_path_factory.mktemp(case)
            zoo.save(model, folder)
            made[case] = (model, folder)
        return made[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_mlx_lm(saved, case):
    model, folder = saved(case)
    theirs = mlx_lm_load(folder)
    expected = np.array(theirs(BATCH))
    assert spread(expected) > 1.0
    np.testing.assert_allclose(np.array(zoo.load_model(folder)(BATCH)), expected, atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(np.array(model(BATCH)), expected, atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_match_mlx_lm_uncached_and_with_every_exact_cache(saved, case):
    _, folder = saved(case)
    expected_tokens, expected_logprobs = mlx_lm_greedy(mlx_lm_load(folder), PROMPT, NEW_TOKENS)
    model = zoo.load_model(folder)
    tokens, logits = greedy_uncached(model, PROMPT, NEW_TOKENS)
    assert_greedy_agrees(tokens, expected_tokens, expected_logprobs)
    for cache in exact_caches():
        tokens, logprobs = greedy_cached(model, PROMPT, NEW_TOKENS, cache, prefill_step=5)
        assert_greedy_agrees(tokens, expected_tokens, expected_logprobs)
        np.testing.assert_allclose(logprobs, expected_logprobs, atol=LOGIT_TOL, rtol=0, err_msg=cache)


def test_transformers_checkpoints_read_by_mlx_lm_and_kvzoo(tmp_path):
    """The same save_pretrained folders through mlx-lm's loader and kvzoo's.

    mlx-lm 0.32 reads a transformers-5 Llama folder as is (it ignores `rope_parameters`, so
    the RoPE here is the default). For GPT-2 it needs the hub checkpoint's layout (no
    `transformer.` prefix, `n_ctx` in the config), which the test writes as on the hub.
    """
    torch = require_module("torch")
    transformers = require_module("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    for name, hf in (("llama", llama), ("gpt2", gpt2)):
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(torch.randn(p.shape) * (0.1 if p.ndim == 1 else 0.3) + (1.0 if p.ndim == 1 else 0.0))
        hf.save_pretrained(tmp_path / name)
    hub = tmp_path / "gpt2"
    weights = mx.load(str(hub / "model.safetensors"))
    mx.save_safetensors(str(hub / "model.safetensors"),
                        {k.removeprefix("transformer."): v for k, v in weights.items()}, metadata={"format": "pt"})
    config = json.loads((hub / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))
    for name in ("llama", "gpt2"):
        expected = np.array(mlx_lm_load(tmp_path / name)(BATCH))
        assert spread(expected) > 1.0
        np.testing.assert_allclose(np.array(zoo.load_model(tmp_path / name)(BATCH)), expected,
                                   atol=LOGIT_TOL, rtol=0, err_msg=name)


def test_mlx_lm_rope_traditional_field_is_honoured(tmp_path):
    """mlx-lm's config.json extension `rope_traditional: true` (weights kept in the
    interleaved order) reads the same in kvzoo and in mlx-lm."""
    model = zoo.build("llama", seed=7, **{**SHAPE, "n_kv_heads": 2, "d_ff": 48, "rope_traditional": True})
    config = zoo.checkpoints.hf.hf_config(model.config)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_traditional": True}))
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    expected = np.array(mlx_lm_load(tmp_path)(BATCH))
    assert spread(expected) > 1.0
    loaded = zoo.load_model(tmp_path)
    assert loaded.config.rope_traditional
    np.testing.assert_allclose(np.array(loaded(BATCH)), expected, atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(np.array(model(BATCH)), expected, atol=LOGIT_TOL, rtol=0)


# -- kvzoo caches inside mlx-lm models ------------------------------------------------------

IN_MLX_LM = [
    (name, options)
    for name in ("concat", "preallocated", "rotating", "quantized")
    for options in __import__("caches").examples(name, head_dim=32, seq_len=30)
]


def _feed(model, cache, tokens, chunks):
    outs, start = [], 0
    for size in chunks:
        outs.append(model(mx.array(tokens[start : start + size])[None], cache=cache)[0])
        start += size
    return mx.concatenate(outs, axis=0)


@pytest.mark.parametrize("name,options", IN_MLX_LM, ids=[f"{n}-{o}" for n, o in IN_MLX_LM])
def test_every_builtin_cache_serves_an_mlx_lm_model(name, options):
    """mlx-lm's llama (its attention, masks via make_mask, quantized attention path) with a kvzoo
    cache gives kvzoo's logits with the same cache, chunk by chunk across a rotating wrap; a
    cache mlx-lm cannot drive correctly is refused with the reason instead."""
    import caches
    from zoo.checkpoints.mlx_lm import to_mlx_lm

    require_module("mlx_lm")
    model = zoo.build("llama", preset="tiny", n_kv_heads=2, seed=3)
    twin = to_mlx_lm(model)
    tokens = [int(t) for t in np.random.RandomState(5).randint(0, 96, 30)]
    chunks = [7, 1, 11, 1, 1, 9]
    ours = _feed(lambda t, cache: model(t, cache), caches.make(name, model, **options), tokens, chunks)
    theirs_cache = caches.make(name, model, **options)
    if options.get("key_bits", options.get("bits")) != options.get("value_bits", options.get("bits")):
        with pytest.raises(NotImplementedError, match="one bit width"):
            _feed(twin, theirs_cache, tokens, chunks)
        return
    theirs = _feed(twin, theirs_cache, tokens, chunks)
    assert mx.abs(ours - theirs).max().item() <= LOGIT_TOL
