"""GGUF tensor types beyond F32 (BF16 and the block-quantized Q8_0, Q4_0, Q4_1), against
llama.cpp's own Python package, gguf-py.

The real stories260K file is rewritten by gguf-py with each matrix converted by its quantizer
(a port of llama.cpp's reference code); kvzoo must load it as exactly the model of an F32 file
holding gguf-py's dequantization of the same data.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import zoo
from helpers.assets import require_asset, require_module
from helpers.gguf_files import rewrite

PROMPT = [1, 403, 407, 261, 378, 300, 40, 365]  # BOS + a stories260K prompt's pieces


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "BF16"])
def test_gguf_types_load_as_llama_cpp_dequantizes_them(tmp_path, type_name):
    gguf = require_module("gguf")
    source = require_asset("stories260K/stories260K.gguf")
    qtype = getattr(gguf.GGMLQuantizationType, type_name)

    def convert(name, array):
        # Matrices whose rows are whole 32-value blocks (ffn_down's 172 are not: it stays F32,
        # as llama.cpp's quantizer would fall back too); vectors stay F32.
        if array.ndim == 2 and (type_name == "BF16" or array.shape[-1] % 32 == 0):
            return gguf.quants.quantize(array, qtype), qtype
        return array, None

    oracle_weights = rewrite(source, tmp_path / "q.gguf", convert)
    assert any(t.tensor_type == qtype for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors)
    rewrite(tmp_path / "q.gguf", tmp_path / "oracle.gguf",
            lambda name, array: (oracle_weights[name].astype(np.float32), None))

    ours = zoo.load_model(tmp_path / "q.gguf", dtype=mx.float32)
    oracle = zoo.load_model(tmp_path / "oracle.gguf")
    tokens = mx.array([PROMPT])
    np.testing.assert_array_equal(np.array(ours(tokens)), np.array(oracle(tokens)))
    # And it is really a different model from the F32 original, not the original read back.
    original = zoo.load_model(source)
    assert mx.abs(ours(tokens) - original(tokens)).max().item() > 1e-4


def test_bf16_keeps_values_float16_cannot_hold(tmp_path):
    """MLX's own GGUF reader turns BF16 into float16, where 1e5 overflows to inf."""
    gguf = require_module("gguf")
    source = require_asset("stories260K/stories260K.gguf")

    def convert(name, array):
        if name == "token_embd.weight":
            array = array.copy()
            array[0, 0] = 1.0e5  # row 0 (<unk>) is never looked up below
            return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
        return array, None

    rewrite(source, tmp_path / "b.gguf", convert)
    model = zoo.load_model(tmp_path / "b.gguf", dtype=None)  # as stored (the default casts on CPU)
    weight = model.model.embed_tokens.weight
    assert weight.dtype == mx.bfloat16 and weight[0, 0].item() == pytest.approx(1.0e5, rel=1e-2)
    assert np.isfinite(np.array(model(mx.array([PROMPT])).astype(mx.float32))).all()
