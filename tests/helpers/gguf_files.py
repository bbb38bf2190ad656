"""GGUF files for tests, written by gguf-py (llama.cpp's Python package) and MLX's writer.

`rewrite` copies a file tensor by tensor through a conversion and returns gguf-py's own
dequantization of what it wrote (the oracle's weights). `random_blocks` makes k-quant and
i-quant blocks gguf-py cannot quantize itself (its quantizers cover Q8_0, Q4_0/1, Q5_0/1,
BF16): random bits with finite float16 scales, sized so the weights have a chosen spread.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .assets import require_module

# Byte offsets of the float16 fields (d, dmin, m) inside one block of each type (ggml-common.h).
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}


def random_blocks(type_name: str, shape: tuple[int, int], rng: np.random.RandomState, std: float = 0.2) -> np.ndarray:
    """uint8 blocks [rows, bytes per row] of `type_name` for a [rows, cols] tensor whose values
    (as gguf-py dequantizes them) have standard deviation about `std`."""
    gguf = require_module("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.randint(0, 256, (rows, cols // block, size)).astype(np.uint8)

    def with_scale(value: float) -> np.ndarray:
        out = raw.copy()
        scale = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
        for at in F16_FIELDS[type_name]:
            out[:, :, at:at + 2] = scale
        return out.reshape(rows, -1)

    # Dequantized values are linear in the float16 fields (all set alike): scale to the spread asked.
    spread = float(np.std(gguf.quants.dequantize(with_scale(1.0), qtype)))
    return with_scale(std / spread)


def rewrite(source, target, convert) -> dict[str, np.ndarray]:
    """Copy a GGUF file with gguf-py, passing each tensor's (name, float32 array) through
    `convert` -> (array to write, raw GGML type or None). Returns what gguf-py reads back from
    the new file for each tensor, dequantized by gguf-py: the oracle's weights."""
    gguf = require_module("gguf")
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        data, raw_type = convert(tensor.name, np.array(tensor.data, dtype=np.float32))
        if raw_type is None:
            writer.add_tensor(tensor.name, data)
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    written = gguf.GGUFReader(str(target))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in written.tensors}


def llama_cpp_permute(w: np.ndarray, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute: HF q/k rows to its RoPE pairing."""
    if n_kv_heads is not None and n_heads != n_kv_heads:
        n_heads = n_kv_heads
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_llama_gguf(path, model) -> None:
    """An F32 GGUF of a zoo llama (HF layout), named and permuted as llama.cpp's converter does."""
    from mlx.utils import tree_flatten

    cfg = model.config
    p = dict(tree_flatten(model.parameters()))
    t = {"token_embd.weight": p["model.embed_tokens.weight"], "output_norm.weight": p["model.norm.weight"]}
    if not cfg.tie_embeddings:
        t["output.weight"] = p["lm_head.weight"]
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}."
        t.update({
            f"blk.{i}.attn_norm.weight": p[hf + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": mx.array(llama_cpp_permute(np.array(p[hf + "self_attn.q_proj.weight"]),
                                                                 cfg.n_heads, cfg.n_heads)),
            f"blk.{i}.attn_k.weight": mx.array(llama_cpp_permute(np.array(p[hf + "self_attn.k_proj.weight"]),
                                                                 cfg.n_heads, cfg.n_kv_heads)),
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
    mx.save_gguf(str(path), {k: v.astype(mx.float32) for k, v in t.items()}, metadata)
