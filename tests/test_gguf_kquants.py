"""GGUF k-quants and i-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) and Q5_0/Q5_1,
against llama.cpp's Python package gguf-py: files gguf-py writes load as exactly gguf-py's
dequantization of them, a Q4_K_M-style model is exactly the model of an F32 file holding that
dequantization, and requantizing it to MLX's format (`kvzoo convert --bits`) gives a folder
mlx-lm runs with kvzoo's logits, in a quarter of the float memory.

gguf-py has no k-quant quantizer, so blocks are random bits with finite scales; its
dequantizer (a port of llama.cpp's reference code) defines what they mean.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers.assets import require_module
from helpers.checkpoint_oracles import LOGIT_TOL, spread
from helpers.gguf_files import random_blocks, rewrite, write_llama_gguf

import zoo
from zoo.checkpoints import gguf as kvzoo_gguf
from zoo.checkpoints import quantized

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q5_0", "Q5_1"]
PROMPT = mx.array([[5, 17, 42, 3, 88, 61, 9, 30, 2, 77]])
# Shapes whose rows are whole 256-value super-blocks, as k-quants need.
SHAPE = dict(vocab_size=96, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512,
             max_positions=64, tie_embeddings=False, init_std=0.05)


@pytest.mark.parametrize("type_name", TYPES)
def test_each_type_reads_as_gguf_py_dequantizes_it(tmp_path, type_name):
    gguf = require_module("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    rng = np.random.RandomState(TYPES.index(type_name))
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), arch="llama")
    blocks = random_blocks(type_name, (6, 512), rng)
    writer.add_tensor("w.weight", blocks, raw_dtype=qtype)
    writer.add_tensor("v.weight", rng.randn(3, 4).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weights, metadata = kvzoo_gguf.read(tmp_path / "t.gguf")
    (tensor,) = [t for t in gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors if t.name == "w.weight"]
    assert tensor.tensor_type == qtype
    expected = gguf.quants.dequantize(tensor.data, qtype).reshape(6, 512)
    assert weights["w.weight"].dtype == mx.float32 and weights["w.weight"].shape == (6, 512)
    np.testing.assert_array_equal(np.array(weights["w.weight"]), expected)
    assert 0.1 < float(np.std(expected)) < 0.4 and metadata["general.architecture"] == "llama"


# A file like llama.cpp's Q4_K_M: Q6_K for attn_v, ffn_down and the output, Q4_K elsewhere.
MIXES = {
    "Q4_K_M": lambda name: "Q6_K" if any(p in name for p in ("attn_v", "ffn_down", "output.")) else "Q4_K",
    "Q2_K": lambda name: "Q2_K", "Q3_K": lambda name: "Q3_K", "Q5_K": lambda name: "Q5_K",
    "IQ4_NL": lambda name: "IQ4_NL",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """mix -> (quantized file, F32 file holding gguf-py's dequantization of it)."""
    gguf = require_module("gguf")
    made = {}

    def get(mix):
        if mix not in made:
            root = tmp_path_factory.mktemp(mix)
            write_llama_gguf(root / "f32.gguf", zoo.build("llama", seed=1, **SHAPE))
            rng = np.random.RandomState(len(made))

            def convert(name, array):
                if array.ndim != 2:
                    return array, None
                type_name = MIXES[mix](name)
                std = 0.6 if name == "token_embd.weight" else 0.05  # embeddings O(1), matrices like init
                return random_blocks(type_name, array.shape, rng, std), getattr(gguf.GGMLQuantizationType, type_name)

            dequantized = rewrite(root / "f32.gguf", root / "q.gguf", convert)
            rewrite(root / "q.gguf", root / "oracle.gguf", lambda name, a: (dequantized[name].astype(np.float32), None))
            made[mix] = (root / "q.gguf", root / "oracle.gguf")
        return made[mix]

    return get


@pytest.mark.parametrize("mix", list(MIXES))
def test_quantized_model_is_the_model_of_its_dequantization(files, mix):
    gguf = require_module("gguf")
    quantized_file, oracle_file = files(mix)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(quantized_file)).tensors}
    assert {MIXES[mix]("blk.0.attn_q.weight"), MIXES[mix]("blk.0.ffn_down.weight")} <= types
    ours, oracle = zoo.load_model(quantized_file), zoo.load_model(oracle_file)
    logits = np.array(oracle(PROMPT))
    assert spread(logits) > 0.5
    np.testing.assert_array_equal(np.array(ours(PROMPT)), logits)


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 32)])
def test_requantized_to_mlx_format_runs_in_mlx_lm(files, tmp_path, capsys, bits, group_size):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from zoo.cli import main as kvzoo

    quantized_file, _ = files("Q4_K_M")
    out = tmp_path / "mlx"
    assert kvzoo(["convert", str(quantized_file), str(out), "--bits", str(bits), "--group-size", str(group_size)]) == 0
    message = capsys.readouterr().err
    assert "MiB ->" in message and "no tokenizer files copied" in message
    model = zoo.load_model(out)
    assert quantized.is_quantized(model)
    float_model = zoo.load_model(quantized_file)
    ratio = quantized.weight_bytes(model) / quantized.weight_bytes(float_model)
    assert ratio < {4: 0.2, 8: 0.35}[bits]  # float32 -> 4 or 8 bits plus a scale and bias per group
    twin, _ = mlx_lm_load_model(Path(out))
    np.testing.assert_allclose(np.array(model(PROMPT)), np.array(twin(PROMPT)), atol=LOGIT_TOL, rtol=0)
    # Requantizing moves the logits a little, not far: the same model.
    drift = np.abs(np.array(model(PROMPT)) - np.array(float_model(PROMPT))).max()
    assert drift < 0.25 * spread(np.array(float_model(PROMPT))) * (4 if bits == 4 else 1)
