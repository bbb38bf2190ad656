"""Composable blocks: norm, MLP activation and gating, per-projection biases, tied or untied
head and a model's own sliding window are config choices for every family.

Each hybrid builds and runs; HF `save`/`load` round-trips every combination some HF model type
expresses (and transformers computes the same logits from the folder), and refuses every other
combination by naming what HF lacks. The property test (tests/test_equivalence.py) draws the
same choices for every cache; here the sliding window is also checked against the true model.
"""

from __future__ import annotations

import itertools
import random

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import caches
import positional
import zoo
from helpers.assets import require_module
from helpers.checkpoint_oracles import LOGIT_TOL, exact_caches, spread
from helpers.equivalence import cached_logits
from zoo.config import ACTIVATIONS, NORMS
from zoo.generate import make_cache

VOCAB = 48
SHAPE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=40, max_positions=64)
TOKENS = mx.array(np.random.RandomState(3).randint(0, VOCAB, (2, 17)))


def randomized(model, seed: int = 0):
    """`model` with every parameter, biases and norms included, drawn at random (init leaves
    biases at zero, which would hide a bias loaded into the wrong place)."""
    rng = np.random.RandomState(seed)
    new = [(name, mx.array((rng.randn(*value.shape) * (0.1 if value.ndim == 1 else 0.3)
                            + (1.0 if "ln" in name or "norm" in name else 0.0)).astype(np.float32)))
           for name, value in tree_flatten(model.parameters())]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def names(model) -> set[str]:
    return {name for name, _ in tree_flatten(model.parameters())}


# -- each choice is really there -----------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_choice_changes_the_model_it_names(family):
    base = randomized(zoo.build(family, **SHAPE))
    rms = zoo.build(family, **SHAPE, norm="rmsnorm")
    ln = zoo.build(family, **SHAPE, norm="layernorm")
    assert not any(n.endswith(("ln_1.bias", "input_layernorm.bias")) for n in names(rms))
    assert any(n.endswith(("ln_1.bias", "input_layernorm.bias")) for n in names(ln))
    gated = (names(zoo.build(family, **SHAPE, gated_mlp=True, mlp_bias=False))
             - names(zoo.build(family, **SHAPE, gated_mlp=False, mlp_bias=False)))
    assert gated == {f"{p}.{i}.mlp.{g}.weight" for i in range(2)
                     for p, g in [("transformer.h" if family == "gpt2" else "model.layers",
                                   "c_gate" if family == "gpt2" else "gate_proj")]}
    for flag, part in [("qkv_bias", ("c_attn.bias", "q_proj.bias")), ("out_bias", ("attn.c_proj.bias", "o_proj.bias")),
                       ("mlp_bias", ("c_fc.bias", "up_proj.bias"))]:
        assert any(n.endswith(part) for n in names(zoo.build(family, **SHAPE, **{flag: True}))), flag
        assert not any(n.endswith(part) for n in names(zoo.build(family, **SHAPE, **{flag: False}))), flag
    assert "lm_head.bias" in names(zoo.build(family, **SHAPE, head_bias=True, tie_embeddings=True))
    assert {"lm_head.bias", "lm_head.weight"} <= names(zoo.build(family, **SHAPE, head_bias=True, tie_embeddings=False))
    # Every activation is a different function of the same weights, by more than parity tests
    # tolerate (exact and tanh GELU differ least: about 7e-4 in these logits).
    outputs = []
    for activation in ACTIVATIONS:
        model = zoo.from_config(base.config.replace(activation=activation))
        model.update(base.parameters())
        outputs.append(np.array(model(TOKENS)))
    for a, b in itertools.combinations(outputs, 2):
        assert np.abs(a - b).max() > 3 * LOGIT_TOL


def test_activations_are_the_named_functions():
    torch = require_module("torch")
    x = np.linspace(-6, 6, 1001).astype(np.float32)
    t = torch.tensor(x)
    expected = {"gelu": torch.nn.functional.gelu(t), "gelu_tanh": torch.nn.functional.gelu(t, approximate="tanh"),
                "relu": torch.relu(t), "silu": torch.nn.functional.silu(t)}
    from zoo.blocks import activation

    for name in ACTIVATIONS:
        np.testing.assert_allclose(np.array(activation(name)(mx.array(x))), expected[name].numpy(),
                                   atol=2e-6, rtol=0, err_msg=name)


def test_a_hybrid_with_the_head_bias_and_window_decodes_like_its_uncached_self():
    model = randomized(zoo.build("gpt2", **SHAPE, norm="rmsnorm", activation="silu", gated_mlp=True,
                                 head_bias=True, tie_embeddings=True, sliding_window=5))
    tokens = TOKENS[0].tolist()
    for name in exact_caches():
        got = cached_logits(model, caches.make(name, model), tokens, [4, 1, 7, 1, 4])
        np.testing.assert_allclose(np.array(got), np.array(model(TOKENS[:1])[0]), atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("change,message", [
    (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm"),
    (dict(activation="gelu_fast"), "activation must be one of gelu, gelu_tanh, relu, silu"),
    (dict(gated_mlp="yes"), "gated_mlp must be True or False"),
    (dict(head_bias=1), "head_bias must be True or False"),
    (dict(sliding_window=0), "sliding_window must be a positive int"),
])
def test_bad_block_choices_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        zoo.build("llama", **SHAPE, **change)


# -- HF save/load: every combination HF expresses round-trips, every other is refused -------

# (family, norm, gated, qkv, out, mlp, head bias, window) -> the HF model type expressing it,
# written from transformers' model code (GPT2: LayerNorm, Conv1D with biases everywhere, no
# head bias; Llama: attention_bias on q/k/v/o, mlp_bias; Qwen2: q/k/v bias only; Mistral: no
# bias, a sliding window; all three: RMSNorm, gated MLP, no head bias).
def hf_type(family, norm, gated, qkv, out, mlp, head, window):
    if family == "gpt2":
        ok = norm == "layernorm" and not gated and qkv and out and mlp and not head and window is None
        return "gpt2" if ok else None
    if norm != "rmsnorm" or not gated or head:
        return None
    if qkv and not out and not mlp:
        return "qwen2"
    if window is not None:
        return "mistral" if not (qkv or out or mlp) else None
    return "llama" if qkv == out else None


STRUCTURES = [
    (family, norm, gated, qkv, out, mlp, head, window)
    for family in ("gpt2", "llama")
    for norm, gated, qkv, out, mlp, head, window in itertools.product(
        NORMS, (False, True), (False, True), (False, True), (False, True), (False, True), (None, 6))
]
BLOCK_FIELDS = ("norm", "gated_mlp", "qkv_bias", "out_bias", "mlp_bias", "head_bias", "sliding_window")
# Every structure once; those HF expresses with every activation, tied and untied.
COMBINATIONS = [
    (structure, activation, tie)
    for structure in STRUCTURES
    for activation, tie in (itertools.product(ACTIVATIONS, (False, True)) if hf_type(*structure)
                            else [(ACTIVATIONS[STRUCTURES.index(structure) % 4], True)])
]


def combination_model(structure, activation, tie, seed=0):
    family, *choices = structure
    overrides = dict(zip(BLOCK_FIELDS, choices), activation=activation, tie_embeddings=tie,
                     positional="learned" if family == "gpt2" else "rope")
    return randomized(zoo.build(family, **SHAPE, **overrides), seed=seed)


def test_every_combination_round_trips_or_is_refused_by_name(tmp_path):
    expressed = set()
    for index, (structure, activation, tie) in enumerate(COMBINATIONS):
        model = combination_model(structure, activation, tie, seed=index)
        folder = tmp_path / str(index)
        expected = hf_type(*structure)
        if expected is None:
            with pytest.raises(ValueError, match="HF") as error:
                zoo.save(model, folder)
            assert not folder.exists()
            assert any(word in str(error.value) for word in
                       ("bias", "LayerNorm", "RMSNorm", "gated", "window")), error.value
            continue
        zoo.save(model, folder)
        config = zoo.checkpoints.hf.hf_config(model.config)
        assert config["model_type"] == expected, structure
        loaded = zoo.load_model(folder)
        assert loaded.config == model.config.replace(init_std=loaded.config.init_std), structure
        ours = dict(tree_flatten(model.parameters()))
        for name, value in tree_flatten(loaded.parameters()):  # the same values in the same places
            np.testing.assert_array_equal(np.array(value), np.array(ours[name]), err_msg=name)
        assert set(ours) == names(loaded)
        np.testing.assert_allclose(np.array(loaded(TOKENS)), np.array(model(TOKENS)), atol=1e-5, rtol=0)
        expressed.add((expected, activation, tie))
    assert {kind for kind, _, _ in expressed} == {"gpt2", "llama", "qwen2", "mistral"}
    assert len(expressed) == 4 * len(ACTIVATIONS) * 2


def transformers_class(model_type):
    transformers = require_module("transformers")
    return {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
            "qwen2": transformers.Qwen2ForCausalLM, "mistral": transformers.MistralForCausalLM}[model_type]


def covering_combinations():
    """Every expressible structure once, cycling through activations and tying, and every
    activation on GPT-2."""
    chosen = []
    expressible = [c for c in COMBINATIONS if hf_type(*c[0])]
    structures = list(dict.fromkeys(c[0] for c in expressible))
    for n, structure in enumerate(structures):
        chosen.append((structure, ACTIVATIONS[n % len(ACTIVATIONS)], bool(n % 2)))
    gpt2 = next(s for s in structures if s[0] == "gpt2")
    chosen += [(gpt2, activation, True) for activation in ACTIVATIONS]
    return list(dict.fromkeys(chosen))


def test_transformers_reads_every_expressible_pattern(tmp_path):
    torch = require_module("torch")
    chosen = covering_combinations()
    assert {hf_type(*structure) for structure, _, _ in chosen} == {"gpt2", "llama", "qwen2", "mistral"}
    tokens = torch.tensor(np.array(TOKENS), dtype=torch.long)
    for index, (structure, activation, tie) in enumerate(chosen):
        model = combination_model(structure, activation, tie, seed=index)
        zoo.save(model, tmp_path / str(index))
        hf = transformers_class(hf_type(*structure)).from_pretrained(tmp_path / str(index)).eval()
        with torch.no_grad():
            expected = hf(tokens).logits.numpy()
        assert spread(expected) > 1.0
        np.testing.assert_allclose(np.array(model(TOKENS)), expected, atol=LOGIT_TOL, rtol=0,
                                   err_msg=f"{structure} {activation} tied={tie}")
    assert len(chosen) >= 10


# -- the model's own sliding window --------------------------------------------------------


def windowed(scheme, window, **overrides):
    return randomized(zoo.build("llama", **{**SHAPE, "n_kv_heads": 2, "positional": scheme,
                                            "sliding_window": window, **overrides}), seed=window)


@pytest.mark.parametrize("scheme", positional.available())
def test_a_window_at_least_the_sequence_is_no_window(scheme):
    model = windowed(scheme, 4)
    full = zoo.from_config(model.config.replace(sliding_window=None))
    full.update(model.parameters())
    wide = zoo.from_config(model.config.replace(sliding_window=TOKENS.shape[1]))
    wide.update(model.parameters())
    np.testing.assert_array_equal(np.array(wide(TOKENS)), np.array(full(TOKENS)))
    # ... and a window shorter than the text changes exactly the positions past it.
    narrow, unwindowed = np.array(model(TOKENS)), np.array(full(TOKENS))
    np.testing.assert_array_equal(narrow[:, :4], unwindowed[:, :4])
    assert np.abs(narrow[:, 4:] - unwindowed[:, 4:]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("scheme", positional.available())
@pytest.mark.parametrize("window", [1, 3, 8])
def test_a_rotating_cache_of_the_window_is_exact_for_every_length(scheme, window):
    """Past max_size a rotating cache forgets keys; on a model whose window is max_size (no
    sinks) the model itself never reads them, so the cache equals the true model throughout."""
    model = windowed(scheme, window, max_positions=128)
    rng = random.Random(window)
    tokens = [rng.randrange(VOCAB) for _ in range(60)]
    chunks = [1, window + 3, 1, 1, 2 * window + 1, 5, 1]
    chunks.append(len(tokens) - sum(chunks))
    cache = caches.make("rotating", model, max_size=window, keep=0)
    got = cached_logits(model, cache, tokens, chunks)
    true_model = model(mx.array([tokens]))[0]  # no reference: the true uncached model
    assert mx.abs(got - true_model).max().item() <= LOGIT_TOL
    assert cache[0].nbytes <= 2 * 2 * window * model.config.head_dim * 4  # keys + values, fp32


def test_the_default_cache_of_a_windowed_model_is_that_window(tmp_path):
    model = windowed("rope", 5)
    cache = make_cache(model)
    assert type(cache[0]).name == "rotating" and (cache[0].max_size, cache[0].keep) == (5, 0)
    assert type(make_cache(zoo.build("llama", **SHAPE))[0]).name == "preallocated"
    prompt = TOKENS[0].tolist()
    tokens = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=30)]
    sequence = list(prompt)
    for token in tokens:  # greedy by repeated uncached forwards of the true model
        logits = model(mx.array([sequence]))[0, -1]
        top2 = mx.sort(logits)[-2:]
        assert token == mx.argmax(logits).item() or (top2[1] - top2[0]).item() <= LOGIT_TOL
        sequence.append(token)
