"""zoo.load_model / zoo.save: formats, layouts, and a clear error for every kind of bad input.

The oracle here is the model that was saved: a checkpoint written in a documented layout
(HF's, or llama.cpp's GGUF with its q/k row permutation copied from llama.cpp's converter)
must load back into a model with the same logits. Parity with HF transformers and mlx-lm on
identical weights is in test_parity_*.py.
"""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np
import pytest

import zoo

VOCAB = 80
TOKENS = mx.array(np.random.RandomState(0).randint(0, VOCAB, (2, 24)))


def tiny(family: str, **overrides):
    shapes = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_positions=64, init_std=0.2)
    if family == "gpt2":
        shapes.update(d_ff=128)
    else:
        shapes.update(n_kv_heads=2, d_ff=48, tie_embeddings=False)
    return zoo.build(family, **{**shapes, **overrides})


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def read_folder(folder) -> tuple[dict, dict]:
    with open(folder / "config.json") as f:
        config = json.load(f)
    return config, dict(mx.load(str(folder / "model.safetensors")))


def write_folder(folder, config: dict, weights: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})


# -- HF folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,overrides", [
    ("gpt2", {}),
    ("gpt2", {"tie_embeddings": False}),
    ("llama", {}),
    ("llama", {"tie_embeddings": True, "qkv_bias": True, "out_bias": True, "mlp_bias": True, "n_kv_heads": 1}),
    ("llama", {"rope_base": 5000.0, "rope_scale": 0.5, "head_dim": 16}),
    ("llama", {"head_dim": 16, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32}}),
])
def test_save_then_load_gives_the_same_model(tmp_path, family, overrides):
    model = tiny(family, **overrides)
    zoo.save(model, tmp_path / "m")
    loaded = zoo.load_model(tmp_path / "m")
    assert loaded.config == model.config.replace(init_std=loaded.config.init_std)
    np.testing.assert_array_equal(logits(loaded), logits(model))


def test_gpt2_layout_is_hf_conv1d_and_the_prefix_is_optional(tmp_path):
    model = tiny("gpt2")
    zoo.save(model, tmp_path / "plain")
    config, weights = read_folder(tmp_path / "plain")
    # HF's Conv1D stores [in, out]: c_attn maps d_model=32 to 3 * 32.
    assert weights["h.0.attn.c_attn.weight"].shape == (32, 96)
    assert weights["h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert "lm_head.weight" not in weights  # tied
    # transformers writes the `transformer.` prefix and old checkpoints carry mask buffers.
    prefixed = {"transformer." + k: v for k, v in weights.items()}
    prefixed["transformer.h.0.attn.bias"] = mx.ones((1, 1, 64, 64))
    prefixed["transformer.h.1.attn.masked_bias"] = mx.array(-1e4)
    write_folder(tmp_path / "prefixed", config, prefixed)
    np.testing.assert_array_equal(logits(zoo.load_model(tmp_path / "prefixed")), logits(model))


def test_llama_ignores_rope_buffers_and_a_tied_lm_head(tmp_path):
    model = tiny("llama", tie_embeddings=True)
    zoo.save(model, tmp_path / "m")
    config, weights = read_folder(tmp_path / "m")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((4,))
    weights["lm_head.weight"] = mx.zeros((VOCAB, 32))  # HF ties it to the embedding anyway
    write_folder(tmp_path / "extra", config, weights)
    np.testing.assert_array_equal(logits(zoo.load_model(tmp_path / "extra")), logits(model))


def test_sharded_folder_with_index(tmp_path):
    model = tiny("llama")
    zoo.save(model, tmp_path / "m")
    config, weights = read_folder(tmp_path / "m")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for shard, members in shards.items():
        mx.save_safetensors(str(folder / shard), {n: weights[n] for n in members})
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(logits(zoo.load_model(folder)), logits(model))

    # An index naming a shard that is not there, or a tensor a shard does not hold.
    broken = dict(weight_map, **{names[0]: "model-00003-of-00002.safetensors"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": broken}))
    with pytest.raises(ValueError, match="model-00003-of-00002.safetensors"):
        zoo.load_model(folder)
    moved = dict(weight_map, **{names[0]: "model-00002-of-00002.safetensors"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(ValueError, match=names[0].replace(".", r"\.")):
        zoo.load_model(folder)


def test_dtype_casts_every_weight(tmp_path):
    zoo.save(tiny("llama"), tmp_path / "m")
    model = zoo.load_model(tmp_path / "m", dtype=mx.float16)
    from mlx.utils import tree_flatten

    assert {a.dtype for _, a in tree_flatten(model.parameters())} == {mx.float16}
    with pytest.raises(TypeError, match="floating-point"):
        zoo.load_model(tmp_path / "m", dtype=mx.int32)
    with pytest.raises(TypeError, match="floating-point"):
        zoo.load_model(tmp_path / "m", dtype="float16")


def test_the_default_dtype_is_the_devices_as_in_the_cli(tmp_path):
    """Half-precision weights load as the device default (float32 on the CPU, where float16
    decodes at ~0.2x: docs/performance.md), the dtype `kvzoo generate --dtype auto` picks;
    dtype=None keeps them as stored."""
    from mlx.utils import tree_flatten

    from zoo.runtime.device import parse_dtype

    half = tiny("llama")
    half.set_dtype(mx.float16)
    zoo.save(half, tmp_path / "m")
    dtypes = lambda m: {a.dtype for _, a in tree_flatten(m.parameters())}  # noqa: E731
    default = zoo.load_model(tmp_path / "m")
    assert dtypes(default) == {parse_dtype("auto")}  # the CLI's choice
    if mx.default_device().type == mx.DeviceType.cpu:
        assert dtypes(default) == {mx.float32}
    assert dtypes(zoo.load_model(tmp_path / "m", dtype=None)) == {mx.float16}
    explicit = zoo.load_model(tmp_path / "m", dtype=parse_dtype("auto"))
    tokens = mx.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.array(default(tokens)), np.array(explicit(tokens)))
    with pytest.raises(TypeError, match="'auto', None"):
        zoo.load_model(tmp_path / "m", dtype="fastest")


# -- HF folder: bad input ------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """(folder, config dict, weights) of a saved tiny GPT-2 and llama."""

    def make(family):
        folder = tmp_path / family
        zoo.save(tiny(family), folder)
        return (folder, *read_folder(folder))

    return make


def test_missing_tensor_is_named(saved):
    folder, config, weights = saved("gpt2")
    del weights["h.1.mlp.c_fc.bias"]
    write_folder(folder, config, weights)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'h\.1\.mlp\.c_fc\.bias'"):
        zoo.load_model(folder)


def test_unexpected_tensor_is_named(saved):
    folder, config, weights = saved("llama")
    weights["model.layers.2.self_attn.q_proj.weight"] = mx.zeros((32, 32))  # a third layer
    write_folder(folder, config, weights)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 'model\.layers\.2\.self_attn\.q_proj\.weight'"):
        zoo.load_model(folder)


def test_misshaped_tensor_is_named_in_the_files_layout(saved):
    folder, config, weights = saved("gpt2")
    weights["h.0.attn.c_attn.weight"] = weights["h.0.attn.c_attn.weight"].T  # not Conv1D layout
    write_folder(folder, config, weights)
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn\.weight' has shape \(96, 32\), the config needs \(32, 96\)"):
        zoo.load_model(folder)


def test_weights_from_another_config_are_refused_before_anything_changes(saved):
    folder, config, weights = saved("llama")
    write_folder(folder, {**config, "intermediate_size": 64}, weights)
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight' has shape \(48, 32\), the config needs \(64, 32\)"):
        zoo.load_model(folder)


@pytest.mark.parametrize("model_type", ["bert", "phi3", None])
def test_unsupported_model_type(saved, model_type):
    folder, config, weights = saved("llama")
    config["model_type"] = model_type
    if model_type is None:
        del config["model_type"]
    write_folder(folder, config, weights)
    with pytest.raises(ValueError, match="model_type") as error:
        zoo.load_model(folder)
    assert "gpt2, llama, mistral, qwen2" in str(error.value)


@pytest.mark.parametrize("family,field", [("gpt2", "n_embd"), ("gpt2", "n_layer"), ("llama", "hidden_size"),
                                          ("llama", "intermediate_size"), ("llama", "vocab_size")])
def test_missing_config_field_is_named(saved, family, field):
    folder, config, weights = saved(family)
    del config[field]
    write_folder(folder, config, weights)
    with pytest.raises(ValueError, match=f"missing '{field}'"):
        zoo.load_model(folder)


@pytest.mark.parametrize("family,change,message", [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None},
     r"llama3 rope scaling needs exactly .*missing \['low_freq_factor'"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "rope_parameters": None},
     "'dynamic' is not supported .*default, linear, llama3"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_scaling": None}, "'yarn' is not supported"),
    ("llama", {"rope_scaling": {"type": "linear"}, "rope_parameters": None}, "positive 'factor'"),
    ("llama", {"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu'"),
    ("gpt2", {"activation_function": "tanh"}, "activation_function 'tanh'"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("llama", {"quantization_config": {"bits": 4}}, "quantized"),
    ("llama", {"num_key_value_heads": 3}, "multiple of n_kv_heads"),
])
def test_unsupported_config_values_are_refused(saved, family, change, message):
    folder, config, weights = saved(family)
    write_folder(folder, {**config, **change}, weights)
    with pytest.raises(ValueError, match=message):
        zoo.load_model(folder)


def test_rope_fields_in_either_spelling(saved):
    folder, config, weights = saved("llama")
    for fields in ({"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_parameters": None},
                   {"rope_theta": None, "rope_scaling": None,
                    "rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0}}):
        write_folder(folder, {**config, **fields}, weights)
        cfg = zoo.load_model(folder).config
        assert (cfg.rope_base, cfg.rope_scale) == (5000.0, 0.25)


def test_truncated_and_corrupt_safetensors(saved):
    folder, config, weights = saved("llama")
    data = (folder / "model.safetensors").read_bytes()
    for damaged in (data[: len(data) // 2], data[:6], b"", b"\x10" + b"\x00" * 7 + b"{not json}"):
        (folder / "model.safetensors").write_bytes(damaged)
        with pytest.raises(ValueError, match="model.safetensors.*(truncated|corrupt)"):
            zoo.load_model(folder)


def test_bad_paths_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        zoo.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        zoo.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="not valid JSON"):
        zoo.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(zoo.checkpoints.hf.hf_config(tiny("llama").config)))
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        zoo.load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="neither a folder nor a .gguf file"):
        zoo.load_model(tmp_path / "weights.bin")


# -- save: what HF cannot express is refused -----------------------------------------------


@pytest.mark.parametrize("family,overrides,message", [
    ("llama", {"positional": "alibi"}, "rope positions only"),
    ("gpt2", {"positional": "rope"}, "learned positions only"),
    ("gpt2", {"n_kv_heads": 2}, "grouped-query"),
    ("gpt2", {"head_dim": 16}, "head_dim \\* n_heads == d_model"),
    ("gpt2", {"qkv_bias": False}, "biases"),
])
def test_save_refuses_models_hf_cannot_express(tmp_path, family, overrides, message):
    with pytest.raises(ValueError, match=message):
        zoo.save(tiny(family, **overrides), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_save_refuses_to_mix_with_other_weights(tmp_path):
    zoo.save(tiny("llama"), tmp_path / "m")
    zoo.save(tiny("llama", seed=1), tmp_path / "m")  # overwriting its own files is fine
    (tmp_path / "m" / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="other weight files"):
        zoo.save(tiny("llama"), tmp_path / "m")
    with pytest.raises(TypeError, match="CausalLM"):
        zoo.save(object(), tmp_path / "n")


# -- GGUF ----------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_like_llama_cpp(path, model, *, metadata_changes=None, tensor_changes=None) -> None:
    """Convert an HF-layout zoo llama to GGUF the way llama.cpp's converter does."""
    cfg = model.config
    from mlx.utils import tree_flatten

    p = dict(tree_flatten(model.parameters()))
    t = {"token_embd.weight": p["model.embed_tokens.weight"], "output_norm.weight": p["model.norm.weight"]}
    if not cfg.tie_embeddings:
        t["output.weight"] = p["lm_head.weight"]
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}."
        q = llama_cpp_permute(np.array(p[hf + "self_attn.q_proj.weight"]), cfg.n_heads, cfg.n_heads)
        k = llama_cpp_permute(np.array(p[hf + "self_attn.k_proj.weight"]), cfg.n_heads, cfg.n_kv_heads)
        t.update({
            f"blk.{i}.attn_norm.weight": p[hf + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": mx.array(q),
            f"blk.{i}.attn_k.weight": mx.array(k),
            f"blk.{i}.attn_v.weight": p[hf + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": p[hf + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": p[hf + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": p[hf + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": p[hf + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": p[hf + "mlp.down_proj.weight"],
        })
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": u32(cfg.d_model),
        "llama.block_count": u32(cfg.n_layers),
        "llama.feed_forward_length": u32(cfg.d_ff),
        "llama.attention.head_count": u32(cfg.n_heads),
        "llama.attention.head_count_kv": u32(cfg.n_kv_heads),
        "llama.attention.layer_norm_rms_epsilon": mx.array(cfg.norm_eps, dtype=mx.float32),
        "llama.rope.dimension_count": u32(cfg.head_dim),
        "llama.rope.freq_base": mx.array(cfg.rope_base, dtype=mx.float32),
        "llama.context_length": u32(cfg.max_positions),
    }
    metadata.update(metadata_changes or {})
    metadata = {k: v for k, v in metadata.items() if v is not None}
    t.update(tensor_changes or {})
    mx.save_gguf(str(path), {k: v for k, v in t.items() if v is not None}, metadata)


@pytest.mark.parametrize("overrides", [
    {},  # GQA, untied
    {"tie_embeddings": True, "n_kv_heads": 1, "rope_base": 5000.0},
])
def test_gguf_converted_by_llama_cpp_rules_matches_the_hf_layout_model(tmp_path, overrides):
    model = tiny("llama", **overrides)
    write_gguf_like_llama_cpp(tmp_path / "m.gguf", model)
    loaded = zoo.load_model(tmp_path / "m.gguf")
    cfg = loaded.config
    assert cfg.rope_traditional and not model.config.rope_traditional
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (
        32, 2, 4, model.config.n_kv_heads, 48, VOCAB)
    assert (cfg.rope_base, cfg.max_positions, cfg.tie_embeddings) == (
        model.config.rope_base, 64, model.config.tie_embeddings)
    np.testing.assert_allclose(logits(loaded), logits(model), atol=1e-4, rtol=0)
    # ... and the test can fail: the HF pairing on llama.cpp's rows is far off.
    wrong = zoo.from_config(cfg.replace(rope_traditional=False))
    wrong.update(loaded.parameters())
    assert np.abs(logits(wrong) - logits(model)).max() > 1e-2


def test_gguf_round_trips_through_save_into_hf_layout(tmp_path):
    model = tiny("llama")
    write_gguf_like_llama_cpp(tmp_path / "m.gguf", model)
    zoo.save(zoo.load_model(tmp_path / "m.gguf"), tmp_path / "hf")
    _, weights = read_folder(tmp_path / "hf")
    from mlx.utils import tree_flatten

    original = dict(tree_flatten(model.parameters()))
    for name, array in weights.items():  # save un-permutes q/k rows back to HF's order exactly
        np.testing.assert_array_equal(np.array(array), np.array(original[name]), err_msg=name)


def test_gguf_default_rope_base_when_the_key_is_absent(tmp_path):
    write_gguf_like_llama_cpp(tmp_path / "m.gguf", tiny("llama"), metadata_changes={"llama.rope.freq_base": None})
    assert zoo.load_model(tmp_path / "m.gguf").config.rope_base == 10000.0


@pytest.mark.parametrize("changes,message", [
    (dict(metadata_changes={"general.architecture": "falcon"}), "unsupported GGUF architecture 'falcon'"),
    (dict(metadata_changes={"llama.block_count": None}), "missing 'llama.block_count'"),
    (dict(metadata_changes={"llama.attention.layer_norm_rms_epsilon": None}), "layer_norm_rms_epsilon"),
    (dict(metadata_changes={"llama.rope.dimension_count": mx.array(4, dtype=mx.uint32)}), "partial rotary"),
    (dict(metadata_changes={"llama.rope.scaling.type": "yarn"}), "'yarn' is not supported"),
    (dict(tensor_changes={"blk.1.ffn_up.weight": None}), r"missing tensor\(s\) 'blk\.1\.ffn_up\.weight'"),
    (dict(tensor_changes={"blk.0.attn_qkv.weight": mx.zeros((96, 32))}), r"unexpected tensor\(s\) 'blk\.0\.attn_qkv\.weight'"),
    (dict(tensor_changes={"blk.0.ffn_gate.weight": mx.zeros((40, 32))}), r"'blk\.0\.ffn_gate\.weight' has shape \(40, 32\), the config needs \(48, 32\)"),
    (dict(tensor_changes={"rope_freqs.weight": mx.ones((4,))}), "rope_freqs"),
    (dict(tensor_changes={"token_embd.weight": None}), "token_embd.weight"),
])
def test_bad_gguf_metadata_and_tensors_are_named(tmp_path, changes, message):
    write_gguf_like_llama_cpp(tmp_path / "m.gguf", tiny("llama"), **changes)
    with pytest.raises(ValueError, match=message):
        zoo.load_model(tmp_path / "m.gguf")


def test_quantized_gguf_tensor_types_are_named(tmp_path):
    mx.save_gguf(str(tmp_path / "q.gguf"), {"token_embd.weight": mx.zeros((8, 32))}, {"general.architecture": "llama"})
    data = bytearray((tmp_path / "q.gguf").read_bytes())
    name = b"token_embd.weight"
    type_at = data.index(name) + len(name) + 4 + 8 * 2  # after the name: rank (u32), 2 dims (u64)
    assert struct.unpack_from("<I", data, type_at)[0] == 0  # F32
    struct.pack_into("<I", data, type_at, 9)  # GGML Q8_1: an activation type no weights file holds
    (tmp_path / "q.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="'token_embd.weight' is stored as Q8_1; kvzoo reads GGUF tensors "
                                         "stored as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K"):
        zoo.load_model(tmp_path / "q.gguf")


def test_corrupt_gguf_headers_are_errors_not_crashes(tmp_path):
    """MLX's GGUF reader trusts the header (b"GGUF" + garbage crashed the process); every one
    of these must be a ValueError."""
    write_gguf_like_llama_cpp(tmp_path / "ok.gguf", tiny("llama"))
    good = (tmp_path / "ok.gguf").read_bytes()
    damaged = {
        "garbage after the magic": b"GGUF" + b"x" * 100,
        "wrong magic": b"GGUX" + good[4:],
        "empty": b"",
        "header only": good[:16],
        "cut in the metadata": good[:200],
        "cut in the tensor data": good[: len(good) - 100],
        "huge tensor count": good[:8] + struct.pack("<Q", 1 << 40) + good[16:],
        "huge string length": good[:24] + struct.pack("<Q", 1 << 50) + good[32:],
    }
    rng = np.random.RandomState(0)
    for i in range(40):  # random bytes flipped inside the header
        data = bytearray(good)
        for at in rng.randint(4, 600, size=4):
            data[at] = rng.randint(256)
        damaged[f"flipped #{i}"] = bytes(data)
    for label, data in damaged.items():
        (tmp_path / "bad.gguf").write_bytes(data)
        try:
            zoo.load_model(tmp_path / "bad.gguf")
        except ValueError:
            continue
        # A flip that lands in a value kvzoo tolerates (a float, an unused key) may load.
        assert label.startswith("flipped"), f"{label}: loaded without error"


def test_load_pairs_the_model_with_its_tokenizer(tmp_path, monkeypatch):
    """`zoo.load` builds the tokenizer with zoo.tokenizers (written in parallel): from the
    folder for HF checkpoints, from the GGUF metadata (its vocabulary) for GGUF files."""
    import sys
    import types

    calls = []
    stub = types.ModuleType("zoo.tokenizers")
    stub.load_tokenizer = lambda folder: calls.append(("folder", folder)) or "folder tokenizer"
    stub.tokenizer_from_gguf = lambda metadata: calls.append(("gguf", metadata)) or "gguf tokenizer"
    monkeypatch.setitem(sys.modules, "zoo.tokenizers", stub)

    zoo.save(tiny("llama"), tmp_path / "m")
    model, tokenizer = zoo.load(tmp_path / "m")
    assert tokenizer == "folder tokenizer" and calls[-1] == ("folder", tmp_path / "m")
    assert isinstance(model, zoo.CausalLM)

    write_gguf_like_llama_cpp(tmp_path / "m.gguf", tiny("llama"),
                              metadata_changes={"tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)]})
    model, tokenizer = zoo.load(tmp_path / "m.gguf")
    kind, metadata = calls[-1]
    assert tokenizer == "gguf tokenizer" and kind == "gguf"
    assert metadata["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
