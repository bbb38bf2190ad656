"""Writing GGUF files (zoo.checkpoints.gguf_write) for llama.cpp: what gguf-py reads back from the
file is the model's weights in llama.cpp's layout, and the loader (checked against llama2.c and
gguf-py elsewhere) turns it back into the same model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import zoo
from zoo.checkpoints.gguf_write import write_gguf

from helpers.assets import require_module
from helpers.gguf_files import llama_cpp_permute

TOKENS = mx.array([[1, 5, 7, 200, 3, 9, 64, 2]])


def _model(**overrides):
    return zoo.build("llama", preset="tiny", vocab_size=300, tie_embeddings=False, **overrides)


@pytest.mark.parametrize("traditional", [False, True])
def test_gguf_py_reads_the_weights_in_llama_cpp_layout(tmp_path, traditional):
    gguf = require_module("gguf")
    model = _model(rope_traditional=traditional)
    path = write_gguf(model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    cfg = model.config
    q = np.array(model.model.layers[1].self_attn.q_proj.weight)
    k = np.array(model.model.layers[1].self_attn.k_proj.weight)
    if not traditional:  # HF pairing -> llama.cpp's, as convert_hf_to_gguf.py permutes
        q, k = llama_cpp_permute(q, cfg.n_heads, cfg.n_heads), llama_cpp_permute(k, cfg.n_heads, cfg.n_kv_heads)
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], q)
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], k)
    np.testing.assert_array_equal(tensors["output.weight"], np.array(model.lm_head.weight))
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"], np.array(model.model.layers[0].mlp.down_proj.weight))
    assert len(tensors) == 2 + 1 + 9 * cfg.n_layers
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == cfg.n_kv_heads
    assert len(fields["tokenizer.ggml.tokens"].contents()) == cfg.vocab_size
    assert "<0x0A>" in fields["tokenizer.ggml.tokens"].contents()  # llama.cpp looks the newline up


@pytest.mark.parametrize("traditional", [False, True])
def test_a_written_f32_file_loads_back_as_the_same_model(tmp_path, traditional):
    model = _model(rope_traditional=traditional)
    loaded = zoo.load_model(write_gguf(model, tmp_path / "m.gguf", "F32"))
    np.testing.assert_allclose(np.array(loaded(TOKENS)), np.array(model(TOKENS)), atol=1e-5)


@pytest.mark.parametrize("file_type", ["F16", "Q8_0"])
def test_half_and_q8_files_hold_gguf_py_rounded_weights(tmp_path, file_type):
    gguf = require_module("gguf")
    model = _model()
    loaded = zoo.load_model(write_gguf(model, tmp_path / "m.gguf", file_type))
    qtype = getattr(gguf.GGMLQuantizationType, file_type)
    w = np.array(model.model.layers[0].mlp.up_proj.weight)
    want = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    np.testing.assert_array_equal(np.array(loaded.model.layers[0].mlp.up_proj.weight), want)
    np.testing.assert_array_equal(np.array(loaded.model.norm.weight), np.array(model.model.norm.weight))  # norms stay F32


def test_models_llama_cpp_cannot_run_as_llama_are_refused(tmp_path):
    with pytest.raises(ValueError, match="plain 'llama' architecture.*'positional': 'alibi'"):
        write_gguf(_model(positional="alibi"), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="file_type must be one of F32, F16, Q8_0"):
        write_gguf(_model(), tmp_path / "b.gguf", "Q4_K")
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        write_gguf(zoo.build("llama", preset="tiny"), tmp_path / "c.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
