"""Writing a llama-family model as a GGUF file with gguf-py (llama.cpp's own Python package).

What `zoo.load` reads back from `checkpoints/gguf.py`, in the other direction: llama.cpp's
tensor names (`GGUFLlamaLayout`), q/k rows in llama.cpp's RoPE pairing, the `llama.*` keys its
loader requires. Used by `kvzoo bench --vs-llamacpp` to hand llama.cpp the very weights kvzoo
and mlx-lm run. A model without a tokenizer gets a placeholder SentencePiece vocabulary (the
256 byte tokens llama.cpp's loader looks up, then filler pieces) so llama.cpp accepts the file;
benchmarks feed it token ids, never text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .gguf import GGUFLlamaLayout

FILE_TYPES = ("F32", "F16", "Q8_0")


def _halves_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's RoPE pairing (i, i + D/2) to llama.cpp's (2i, 2i+1) per head; w: [n_heads * D, ...]
    (convert_hf_to_gguf.py's `LlamaModel.permute`)."""
    D = w.shape[0] // n_heads
    # [H * D, K] -> [H, 2, D/2, K] -> [H, D/2, 2, K] -> [H * D, K]
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _placeholder_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then filler pieces: a vocabulary llama.cpp's
    SentencePiece loader accepts (it looks up the byte tokens, e.g. the newline)."""
    if vocab_size < 3 + 256:
        raise ValueError(f"a placeholder vocabulary needs vocab_size >= 259, got {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab_size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab_size - 259)  # unknown, control, byte, normal
    scores = [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)]
    return tokens, scores, types


def _copy_tokenizer(gguf: Any, writer: Any, source: Path) -> None:
    """Every `tokenizer.*` key of the GGUF file `source`, as stored."""
    fields = gguf.GGUFReader(str(source)).fields
    copied = 0
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
            copied += 1
    if not copied:
        raise ValueError(f"{source} has no tokenizer.* keys to copy")


def write_gguf(model: Any, path: Path, file_type: str = "F32", *,
               tokenizer: Optional[Union[dict[str, Any], str, Path]] = None) -> Path:
    """Write `model` (llama family, RoPE, gated SiLU MLP, RMSNorm, no biases) to `path`.

    file_type: "F32", "F16" or "Q8_0" for the 2-D weights (norms stay F32, as llama.cpp's
    converter keeps them). `tokenizer`: {"tokens", "scores", "types"} lists to embed, or None for
    a placeholder vocabulary (see the module docstring), or a GGUF file whose `tokenizer.*`
    keys are copied (the model's own tokenizer, for text llama.cpp can read and write).
    """
    import gguf

    cfg = model.config
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
    wanted = dict(family="llama", positional="rope", norm="rmsnorm", activation="silu", gated_mlp=True,
                  qkv_bias=False, out_bias=False, mlp_bias=False, head_bias=False, rope_scaling=None,
                  sliding_window=None)
    wrong = {k: getattr(cfg, k) for k, v in wanted.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"GGUF writing supports llama.cpp's plain 'llama' architecture "
                         f"({wanted}); this model has {wrong}")
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[file_type]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("kvzoo export")
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[file_type])
    writer.add_context_length(cfg.max_positions)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(int(model.model.layers[0].mlp.up_proj.weight.shape[0]))
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_base))
    if cfg.rope_scale != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(1.0 / cfg.rope_scale)
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if isinstance(tokenizer, (str, Path)):
        _copy_tokenizer(gguf, writer, Path(tokenizer))
    else:
        vocab = tokenizer or dict(zip(("tokens", "scores", "types"), _placeholder_vocab(cfg.vocab_size)))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["types"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)

    layout = GGUFLlamaLayout(cfg)
    for name, array in tree_flatten(model.parameters()):
        w = np.array(array.astype(mx.float32), dtype=np.float32)
        if not cfg.rope_traditional and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads
            w = _halves_to_interleaved(w, heads)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(layout.file_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(layout.file_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

