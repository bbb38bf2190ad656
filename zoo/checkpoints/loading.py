"""Load real checkpoints (HF folders, GGUF files) into the zoo's families, and save them back.

    model = zoo.load_model("path/to/hf-folder")          # config.json + *.safetensors
    model = zoo.load_model("stories260K.gguf")            # llama-architecture GGUF
    model, tokenizer = zoo.load("path/to/hf-folder")
    zoo.save(model, "out/")                              # read by zoo.load and transformers

Everything is checked before the model is built: a missing path, an unsupported model type,
a missing config field, a corrupt file, or tensors that do not fit the config are a clear
error naming the file, field or tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx

from ..model import CausalLM
from ..registry import from_config
from . import gguf, hf, quantized, safetensors
from .finite import POSITIVE_HF_FIELDS, check_finite, check_positive_fields
from .layout import assign_weights, file_weights_of

PathLike = Union[str, Path]
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


DtypeArg = Union[mx.Dtype, str, None]


def load_model(path: PathLike, *, dtype: DtypeArg = "auto", group: Any = None) -> CausalLM:
    """A model from an HF-style folder (config.json + *.safetensors, model_type gpt2 or
    llama) or a llama-architecture .gguf file.

    `dtype` casts the floating-point weights: "auto" (the default, as `kvzoo generate`) is the
    device's fastest dtype (`zoo.runtime.device.default_dtype`: float32 on the CPU, where
    float16 weights decode at about 0.2x and bfloat16 at 0.45x of float32; float16 on a GPU),
    None keeps them as stored, an mx.Dtype casts to it.

    `group` (an mx.distributed.Group of more than one process; default: the one
    zoo.distributed.enable set, as the CLI does under mlx.launch) returns this process's
    shard (zoo.shard), sliced block by block while reading safetensors, so the whole model
    is never in this process's memory (a GGUF file is read whole first)."""
    return _load_with_source(path, dtype, group)[0]


def load(path: PathLike, *, dtype: DtypeArg = "auto", group: Any = None) -> tuple[CausalLM, Any]:
    """(model, tokenizer) from an HF-style folder (tokenizer files beside the weights) or a
    .gguf file (tokenizer from its embedded vocabulary). `dtype` and `group` as in `load_model`."""
    from ..tokenizers import load_tokenizer, tokenizer_from_gguf

    model, (kind, source) = _load_with_source(path, dtype, group)
    if kind == "gguf":
        try:
            tokenizer = tokenizer_from_gguf(source)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None
    else:
        tokenizer = load_tokenizer(source)
    ids = getattr(tokenizer, "vocab_size", None)
    if isinstance(ids, int) and ids > model.config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer and the model do not match: the tokenizer has "
            f"{tokenizer.vocab_size} ids but the model's embedding has {model.config.vocab_size} rows")
    return model, tokenizer


def save(model: CausalLM, path: PathLike) -> Path:
    """Write `model` as an HF-style folder: config.json + model.safetensors with HF's names
    and layouts. `zoo.load_model` and transformers' `from_pretrained` both read it.

    A quantized model (MLX's QuantizedLinear layers: loaded from an mlx-lm folder, or
    `zoo.checkpoints.quantized.quantize`d) is written as mlx-lm writes one: config.json with
    `quantization`, mlx-lm's tensor names; zoo.load and mlx_lm.load read it, transformers cannot.

    Raises ValueError if HF transformers has no model equal to this one (e.g. ALiBi, or GQA
    in GPT-2), or if the folder already holds other weight files. Returns the folder.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"save needs a zoo model (CausalLM), got {type(model).__name__}")
    config = hf.hf_config(model.config)
    folder = Path(path)
    _check_target(folder)
    if quantized.is_quantized(model):
        if model.config.rope_traditional:
            config["rope_traditional"] = True  # packed rows cannot be permuted to HF's RoPE pairing
        config["torch_dtype"] = _float_dtype(model)
        return quantized.save_quantized(model, folder, type(model).mlx_layout(model.config), config)
    weights = file_weights_of(model, hf.layout(model.config))
    dtypes = {str(a.dtype).removeprefix("mlx.core.") for a in weights.values()}
    config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / WEIGHTS), weights, metadata={"format": "pt"})
    with open(folder / CONFIG, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return folder


# -- implementation ------------------------------------------------------------------------


def _check_target(folder: Path) -> None:
    """ValueError if `folder` is a file or already holds other weight files."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; save writes a folder")
    if folder.is_dir():
        stale = sorted(p.name for p in folder.glob("*.safetensors*") if p.name != WEIGHTS)
        if stale:
            raise ValueError(
                f"{folder} already holds other weight files {stale}; loading would mix them "
                f"with the saved model. Save into an empty folder"
            )


def _float_dtype(model: CausalLM) -> str:
    """The dtype of the model's floating-point parameters (float32 when they differ)."""
    from mlx.utils import tree_flatten

    dtypes = {str(a.dtype).removeprefix("mlx.core.") for _, a in tree_flatten(model.parameters())
              if mx.issubdtype(a.dtype, mx.floating)}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _resolve_dtype(dtype: DtypeArg) -> Optional[mx.Dtype]:
    """"auto" -> the device default; None and floating mx.Dtypes as given; anything else refused."""
    if isinstance(dtype, str) and dtype == "auto":
        from ..runtime.device import default_dtype

        return default_dtype()
    if dtype is not None and not (isinstance(dtype, mx.Dtype) and mx.issubdtype(dtype, mx.floating)):
        raise TypeError(f"dtype must be 'auto', None (as stored) or a floating-point mx.Dtype "
                        f"(mx.float32, mx.float16, mx.bfloat16), got {dtype!r}")
    return dtype


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == gguf.MAGIC


def _load_with_source(path: PathLike, dtype: DtypeArg, group: Any = None) -> tuple[CausalLM, tuple[str, Any]]:
    """(model, ("gguf", metadata) or ("folder", folder path)); sharded over `group` (see load_model)."""
    from .. import distributed

    group = distributed.default_group() if group is None else group
    if group is None or group.size() == 1:
        return _read_source(path, dtype, evaluate=True)
    model, source = _read_source(path, dtype, evaluate=False)  # lazy: nothing read yet
    model = distributed.shard(model, group)
    from mlx.utils import tree_flatten

    # finite weights, checked on this process's shard only (the rest was never read)
    check_finite(dict(tree_flatten(model.parameters())), lambda name: f"{path} ({name}, this process's shard)")
    return model, source


def _read_source(path: PathLike, dtype: DtypeArg, evaluate: bool) -> tuple[CausalLM, tuple[str, Any]]:
    dtype = _resolve_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a model path must be a str or Path naming an HF-style folder or a .gguf "
                        f"file, got {type(path).__name__} {path!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: expected an HF-style folder or a .gguf file")
    if path.is_dir():
        return _load_folder(path, dtype, evaluate), ("folder", path)
    if _is_gguf(path):
        model, metadata = _load_gguf(path, dtype, evaluate)
        return model, ("gguf", metadata)
    raise ValueError(
        f"{path} is neither a folder nor a .gguf file; for safetensors weights pass the folder "
        f"holding them and their config.json"
    )


def _load_gguf(path: Path, dtype: Optional[mx.Dtype], evaluate: bool = True) -> tuple[CausalLM, dict[str, Any]]:
    weights, metadata = gguf.read(path)
    check_finite(weights, lambda name: str(path))
    try:
        config = gguf.config_from_gguf(metadata, weights)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{path}: {error}") from None
    model = from_config(config)
    assign_weights(model, weights, gguf.GGUFLlamaLayout(config), str(path), dtype, evaluate)
    return model, metadata


def _load_folder(folder: Path, dtype: Optional[mx.Dtype], evaluate: bool = True) -> CausalLM:
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise ValueError(
            f"{folder} has no {CONFIG}; kvzoo loads HF-style folders (config.json + *.safetensors) "
            f"or .gguf files"
        )
    try:
        with open(config_path) as f:
            hf_dict = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(hf_dict, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(hf_dict).__name__}")
    hf_dict = dict(hf_dict)
    check_positive_fields(hf_dict, POSITIVE_HF_FIELDS, str(config_path))
    for nested in ("rope_scaling", "rope_parameters"):
        if isinstance(hf_dict.get(nested), dict):
            check_positive_fields(hf_dict[nested], ("factor", "rope_theta"), f"{config_path} {nested}")
    quantization = quantized.read_quantization(hf_dict)  # mlx-lm's quantized folders
    try:
        config = hf.config_from_hf(hf_dict)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{config_path}: {error}") from None
    weights = read_safetensors_folder(folder, check=evaluate)
    model = from_config(config)
    layout = hf.layout(config, list(weights))
    if quantization is not None:
        weights = quantized.quantize_from_file(model, quantization, weights, layout)
    assign_weights(model, weights, layout, str(folder), dtype, evaluate)
    return model


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    safetensors.check_file(path)  # bounds-checked header first: MLX's reader trusts the file
    try:
        return mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: cannot read safetensors file ({error}); it may be truncated or corrupt") from None


def read_safetensors_folder(folder: Path, check: bool = True) -> dict[str, mx.array]:
    """Every tensor of a folder's safetensors files, following model.safetensors.index.json
    when there is one (sharded checkpoints)."""
    index_path = folder / INDEX
    weight_map: Optional[dict[str, str]] = None
    if index_path.exists():
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path} is not a valid index (needs a 'weight_map'): {error}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ValueError(f"{index_path} names shard {file.name!r}, which is not in {folder}")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{folder} has no *.safetensors files (kvzoo reads safetensors weights only)")
    weights: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for file in files:
        tensors = _read_safetensors(file)
        if check:  # False: the caller checks what it keeps (a shard), reading nothing more
            check_finite(tensors, lambda name: str(file))
        for name, array in tensors.items():
            if name in weights:
                raise ValueError(f"tensor {name!r} appears in both {origin[name]} and {file.name}")
            weights[name], origin[name] = array, file.name
    for name, shard in (weight_map or {}).items():
        if origin.get(name) != shard:
            raise ValueError(f"{index_path} says tensor {name!r} is in {shard}, but it is not there")
    return weights
