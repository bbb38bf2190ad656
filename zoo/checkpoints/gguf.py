"""GGUF files (llama.cpp): check the file, read its llama config, and name its tensors.

`check_file` walks the header in Python first (bounds-checked, nothing but the header is
read) so a bad file is a ValueError; then tensors are read from the file's bytes and the
metadata by gguf-py's reader.

Tensor types: F32, F16, BF16, and the block-quantized types llama.cpp's Python package
gguf-py dequantizes (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the k-quants Q2_K..Q6_K, IQ4_NL, IQ4_XS and
the other i-quants), dequantized to float32 at load by `gguf.quants.dequantize`; the model then
runs unquantized, or is requantized to MLX's format (`zoo.checkpoints.quantized.quantize`,
`kvzoo convert --bits`). BF16 is read here rather than by MLX, whose GGUF reader turns it into
float16 (bf16's range does not fit: large values become inf).

llama.cpp's converter permutes the rows of q/k projections so that consecutive features form
RoPE pairs (its "interleaved" layout). GGUF models therefore run with `rope_traditional=True`;
`interleaved_to_halves` turns such rows back into HF's layout (pairs (i, i + D/2)).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from .layout import CheckpointLayout

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# Tensor types kvzoo reads: GGML type id -> (name, values per block, bytes per block). The float
# types are read directly; every block-quantized type gguf-py dequantizes (llama.cpp's reference
# code, ported: gguf.quants) is dequantized by it to float32. Every other type is named in the error.
FLOAT_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2)}
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                   "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                   "TQ1_0", "TQ2_0")


def _read_types() -> dict[int, tuple[str, int, int]]:
    """FLOAT_TYPES plus the quantized types this gguf-py dequantizes, with llama.cpp's block sizes."""
    types = dict(FLOAT_TYPES)
    try:
        import gguf as gguf_py
        from gguf import quants
    except ImportError:  # gguf is a dependency; without it only float tensors can be read
        return types
    traits = getattr(quants, "_type_traits", {})
    for name in QUANTIZED_TYPES:
        qtype = getattr(gguf_py.GGMLQuantizationType, name, None)
        if qtype is not None and (not traits or qtype in traits):
            block, size = gguf_py.GGML_QUANT_SIZES[qtype]
            types[int(qtype)] = (name, block, size)
    return types


READ_TYPES = _read_types()
OTHER_TYPES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    34: "TQ1_0", 35: "TQ2_0",
}
READABLE = ", ".join(name for name, *_ in READ_TYPES.values())
MB_PER_READ = 64  # quantized tensors are dequantized this many MiB of blocks at a time

# Metadata value types: id -> struct format of one scalar (8 = string, 9 = array).
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class _Header:
    """A bounds-checked cursor over the bytes of a GGUF file."""

    def __init__(self, data: Any, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(
            f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos} of "
            f"{len(self.data)}); the file may be truncated or corrupt"
        )

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"{what} runs past the end of the file")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, start)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.data[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_value(self, kind: int, what: str, depth: int = 0) -> Any:
        """Skip one metadata value; return it when it is a scalar (alignment needs one)."""
        if kind in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[kind], what)
        if kind == STRING:
            self.take(self.scalar("<Q", what), what)
            return None
        if kind == ARRAY and depth < 2:
            item_kind = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if item_kind in SCALAR_FORMATS:
                self.take(count * struct.calcsize(SCALAR_FORMATS[item_kind]), what)
            elif item_kind in (STRING, ARRAY):
                if count * 8 > len(self.data) - self.pos:  # each item needs at least 8 bytes
                    raise self.fail(f"{what} claims {count} items, more than the file holds")
                for _ in range(count):
                    self.skip_value(item_kind, what, depth + 1)
            else:
                raise self.fail(f"{what} has unknown array item type {item_kind}")
            return None
        raise self.fail(f"{what} has unknown value type {kind}")


def check_file(path: Path) -> dict[str, tuple[int, list[int], int]]:
    """Raise ValueError unless `path` is a well-formed GGUF v2/v3 file of tensor types kvzoo
    reads; returns name -> (GGML type, dims (innermost first), absolute data offset).

    Checks the header, every metadata entry, every tensor's type, and that every tensor's data
    lies inside the file. Reads only the header.
    """
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path} is not a valid GGUF file: only {size} bytes (truncated or empty)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = _Header(data, path)
        if bytes(data[:4]) != MAGIC:
            raise header.fail(f"it starts with {bytes(data[:4])!r}, not the magic {MAGIC!r}")
        header.pos = 4
        version = header.scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            raise header.fail(f"GGUF version {version} is not supported (supported: 2, 3)")
        n_tensors = header.scalar("<Q", "tensor count")
        n_metadata = header.scalar("<Q", "metadata count")
        if n_tensors * 24 + n_metadata * 12 > size:
            raise header.fail(f"it claims {n_tensors} tensors and {n_metadata} metadata entries, more than {size} bytes can hold")
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_metadata):
            key = header.string(f"metadata key #{i}")
            kind = header.scalar("<I", f"type of metadata {key!r}")
            value = header.skip_value(kind, f"metadata {key!r}")
            if key == "general.alignment":
                alignment = value
                if not isinstance(value, int) or value < 1 or value & (value - 1):
                    raise header.fail(f"general.alignment must be a power of two, got {value!r}")
        tensors = []
        for i in range(n_tensors):
            name = header.string(f"name of tensor #{i}")
            n_dims = header.scalar("<I", f"rank of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise header.fail(f"tensor {name!r} has rank {n_dims} (allowed: 1..{MAX_DIMS})")
            dims = [header.scalar("<Q", f"shape of tensor {name!r}") for _ in range(n_dims)]
            kind = header.scalar("<I", f"type of tensor {name!r}")
            offset = header.scalar("<Q", f"offset of tensor {name!r}")
            if kind not in READ_TYPES:
                type_name = OTHER_TYPES.get(kind, f"unknown type {kind}")
                raise ValueError(
                    f"{path}: tensor {name!r} is stored as {type_name}; kvzoo reads GGUF tensors "
                    f"stored as {READABLE} (requantize or convert the model to one of those)"
                )
            block = READ_TYPES[kind][1]
            if dims[0] % block:
                raise header.fail(f"tensor {name!r} ({READ_TYPES[kind][0]}) has rows of {dims[0]} values, "
                                  f"not a whole number of {block}-value blocks")
            tensors.append((name, dims, kind, offset))
        data_start = -(-header.pos // alignment) * alignment
        found: dict[str, tuple[int, list[int], int]] = {}
        for name, dims, kind, offset in tensors:
            if name in found:
                raise header.fail(f"tensor {name!r} appears twice")
            _, block, block_bytes = READ_TYPES[kind]
            n_bytes = math.prod(dims) // block * block_bytes
            if offset % alignment or data_start + offset + n_bytes > size:
                raise ValueError(
                    f"{path}: the data of tensor {name!r} ({n_bytes} bytes at offset {offset}) "
                    f"lies outside the file ({size} bytes) or is misaligned; the file is "
                    f"truncated or corrupt"
                )
            found[name] = (kind, dims, data_start + offset)
        return found


def read(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors and metadata of a GGUF file, after `check_file`.

    F32 and F16 tensors are read as stored, BF16 as bfloat16 (MLX's reader would make it
    float16, where large values become inf); block-quantized ones are dequantized to float32 by
    gguf-py (`gguf.quants.dequantize`, llama.cpp's reference arithmetic). Metadata comes from
    gguf-py's reader: strings, numbers, and lists of them.
    """
    tensors = check_file(path)
    metadata = read_metadata(path)
    weights = {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, (kind, dims, start) in tensors.items():
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        type_name, block, block_bytes = READ_TYPES[kind]
        n_bytes = math.prod(dims) // block * block_bytes
        raw = data[start:start + n_bytes]
        if type_name == "BF16":
            as_float = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)  # bf16: the top half of an fp32
            weights[name] = mx.array(as_float.reshape(shape)).astype(mx.bfloat16)
        elif type_name in ("F32", "F16"):
            weights[name] = mx.array(np.array(raw.view("<f4" if type_name == "F32" else "<f2")).reshape(shape))
        else:
            weights[name] = mx.array(dequantize(raw, kind, shape))
    return weights, metadata


def dequantize(raw: np.ndarray, kind: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values [*shape] of GGML blocks `raw` (uint8) of type `kind`, by gguf-py."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(kind)
    row_bytes = shape[-1] // READ_TYPES[kind][1] * READ_TYPES[kind][2]
    rows = raw.reshape(-1, row_bytes)  # [rows, bytes of one row]
    step = max(1, (MB_PER_READ << 20) // row_bytes)
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
    for first in range(0, rows.shape[0], step):  # bounded temporary memory for large tensors
        out[first:first + step] = quants.dequantize(np.asarray(rows[first:first + step]), qtype)
    return out.reshape(shape)


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata entry of a GGUF file (gguf-py's reader; its own "GGUF.*" entries left out):
    str, int, float, bool, or a list of them."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # check_file has already checked the header; be clear anyway
        raise ValueError(f"{path}: cannot read GGUF metadata: {error}") from None
    try:
        return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except Exception as error:  # a corrupt entry (e.g. a string that is not UTF-8)
        raise ValueError(f"{path}: a GGUF metadata entry is unreadable ({type(error).__name__}: {error}); "
                         f"the file is corrupt") from None


# -- llama config from metadata ------------------------------------------------------------

SUPPORTED_ARCHITECTURES = ("llama",)


def _value(metadata: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key not in metadata:
        if required:
            raise ValueError(f"GGUF metadata is missing {key!r}, which kvzoo needs to build the model")
        return default
    value = metadata[key]
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _positive(metadata: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> float:
    """A metadata number that must be finite and > 0 (an epsilon, a RoPE base or factor)."""
    value = _value(metadata, key, default, required=required)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"GGUF metadata {key!r} must be a finite number > 0, got {value!r}")
    return float(value)


def config_from_gguf(metadata: dict[str, Any], weights: dict[str, mx.array]) -> ModelConfig:
    """The ModelConfig of a llama-architecture GGUF model (RoPE in llama.cpp's pairing)."""
    arch = _value(metadata, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; kvzoo loads: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    p = f"{arch}."
    if _value(metadata, p + "expert_count", 0):
        raise ValueError("mixture-of-experts GGUF models (llama.expert_count > 0) are not supported")
    d_model = int(_value(metadata, p + "embedding_length", required=True))
    n_heads = int(_value(metadata, p + "attention.head_count", required=True))
    head_dim = int(_value(metadata, p + "attention.key_length", d_model // max(n_heads, 1)))
    value_dim = int(_value(metadata, p + "attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"GGUF key_length {head_dim} != value_length {value_dim} is not supported")
    rope_dims = int(_value(metadata, p + "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"GGUF rope.dimension_count is {rope_dims} but heads have {head_dim} features; "
            f"partial rotary embeddings are not supported"
        )
    rope_scale = 1.0
    scaling = _value(metadata, p + "rope.scaling.type", "none")
    if scaling == "linear":
        rope_scale = 1.0 / _positive(metadata, p + "rope.scaling.factor", required=True)
    elif scaling != "none":
        raise ValueError(f"GGUF rope.scaling.type {scaling!r} is not supported (supported: none, linear)")
    if "token_embd.weight" not in weights:
        raise ValueError("GGUF file is missing tensor 'token_embd.weight' (the token embedding)")
    vocab_size = int(weights["token_embd.weight"].shape[0])
    declared_vocab = _value(metadata, p + "vocab_size")
    if declared_vocab is not None and int(declared_vocab) != vocab_size:
        raise ValueError(
            f"GGUF {p}vocab_size is {declared_vocab} but token_embd.weight has {vocab_size} rows"
        )
    output = weights.get("output.weight")
    tied = output is None or (
        output.shape == weights["token_embd.weight"].shape
        and bool(mx.array_equal(output, weights["token_embd.weight"]))
    )
    return ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=int(_value(metadata, p + "block_count", required=True)),
        n_heads=n_heads,
        n_kv_heads=int(_value(metadata, p + "attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(_value(metadata, p + "feed_forward_length", required=True)),
        positional="rope",
        max_positions=int(_value(metadata, p + "context_length", 2048)),
        rope_base=_positive(metadata, p + "rope.freq_base", 10000.0),
        rope_traditional=True,
        rope_scale=rope_scale,
        norm_eps=_positive(metadata, p + "attention.layer_norm_rms_epsilon", required=True),
        tie_embeddings=tied,
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        qkv_bias="blk.0.attn_q.bias" in weights,
        out_bias="blk.0.attn_output.bias" in weights,
        mlp_bias="blk.0.ffn_up.bias" in weights,
    )


# -- tensor names --------------------------------------------------------------------------

_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_OUR_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)")


class GGUFLlamaLayout(CheckpointLayout):
    """llama.cpp's tensor names for the llama family (shapes and row order kept as stored)."""

    def __init__(self, config: ModelConfig):
        self.config = config

    def model_name(self, file_name: str) -> Optional[str]:
        if file_name == "rope_freqs.weight":
            raise ValueError(
                "GGUF tensor 'rope_freqs.weight' (llama3-style RoPE frequency scaling) is not supported"
            )
        if file_name == "output.weight" and self.config.tie_embeddings:
            return None  # identical to token_embd.weight (checked when the config was read)
        stem, _, kind = file_name.rpartition(".")
        if stem in _TOP and kind in ("weight", "bias"):
            return f"{_TOP[stem]}.{kind}"
        match = _BLOCK_NAME.fullmatch(file_name)
        if match and match.group(2) in _BLOCK:
            layer, part, kind = match.groups()
            return f"model.layers.{layer}.{_BLOCK[part]}.{kind}"
        return file_name  # not a llama tensor: reported as unexpected under its own name

    def file_name(self, name: str) -> str:
        for gguf, ours in _TOP.items():
            if name.startswith(ours + ".") and name.count(".") == ours.count(".") + 1:
                return gguf + name[len(ours):]
        match = _OUR_BLOCK_NAME.fullmatch(name)
        if match:
            layer, part, kind = match.groups()
            for gguf, ours in _BLOCK.items():
                if ours == part:
                    return f"blk.{layer}.{gguf}.{kind}"
        return name


def interleaved_to_halves(w: mx.array, n_heads: int) -> mx.array:
    """Reorder q/k projection rows from llama.cpp's RoPE pairing to HF's.

    Per head, rows (2i, 2i+1) form a rotation pair in llama.cpp's layout (rope_traditional=True);
    in HF's they are rows (i, i + D/2). Undoes llama.cpp's `permute`. w: [n_heads * D, ...].
    """
    rest = w.shape[1:]
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
