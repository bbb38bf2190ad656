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
from . import gguf, hf, safetensors
from .finite import POSITIVE_HF_FIELDS, check_finite, check_positive_fields
from .layout import assign_weights, file_weights_of

PathLike = Union[str, Path]
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def load_model(path: PathLike, *, dtype: Optional[mx.Dtype] = None) -> CausalLM:
    """A model from an HF-style folder (config.json + *.safetensors, model_type gpt2 or
    llama) or a llama-architecture .gguf file. `dtype` casts the weights (None: as stored)."""
    return _load_with_source(path, dtype)[0]


def load(path: PathLike, *, dtype: Optional[mx.Dtype] = None) -> tuple[CausalLM, Any]:
    """(model, tokenizer) from an HF-style folder (tokenizer files beside the weights) or a
    .gguf file (tokenizer from its embedded vocabulary)."""
    from ..tokenizers import load_tokenizer, tokenizer_from_gguf

    model, (kind, source) = _load_with_source(path, dtype)
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

    Raises ValueError if HF transformers has no model equal to this one (e.g. ALiBi, or GQA
    in GPT-2), or if the folder already holds other weight files. Returns the folder.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"save needs a zoo model (CausalLM), got {type(model).__name__}")
    config = hf.hf_config(model.config)
    weights = file_weights_of(model, hf.layout(model.config))
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; save writes a folder")
    if folder.is_dir():
        stale = sorted(p.name for p in folder.glob("*.safetensors*") if p.name != WEIGHTS)
        if stale:
            raise ValueError(
                f"{folder} already holds other weight files {stale}; loading would mix them "
                f"with the saved model. Save into an empty folder"
            )
    dtypes = {str(a.dtype).removeprefix("mlx.core.") for a in weights.values()}
    config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / WEIGHTS), weights, metadata={"format": "pt"})
    with open(folder / CONFIG, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return folder


# -- implementation ------------------------------------------------------------------------


def _check_dtype(dtype: Optional[mx.Dtype]) -> None:
    if dtype is not None and not (isinstance(dtype, mx.Dtype) and mx.issubdtype(dtype, mx.floating)):
        raise TypeError(f"dtype must be None or a floating-point mx.Dtype (mx.float32, mx.float16, "
                        f"mx.bfloat16), got {dtype!r}")


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == gguf.MAGIC


def _load_with_source(path: PathLike, dtype: Optional[mx.Dtype]) -> tuple[CausalLM, tuple[str, Any]]:
    """(model, ("gguf", metadata) or ("folder", folder path))."""
    _check_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a model path must be a str or Path naming an HF-style folder or a .gguf "
                        f"file, got {type(path).__name__} {path!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: expected an HF-style folder or a .gguf file")
    if path.is_dir():
        return _load_folder(path, dtype), ("folder", path)
    if _is_gguf(path):
        model, metadata = _load_gguf(path, dtype)
        return model, ("gguf", metadata)
    raise ValueError(
        f"{path} is neither a folder nor a .gguf file; for safetensors weights pass the folder "
        f"holding them and their config.json"
    )


def _load_gguf(path: Path, dtype: Optional[mx.Dtype]) -> tuple[CausalLM, dict[str, Any]]:
    weights, metadata = gguf.read(path)
    check_finite(weights, lambda name: str(path))
    try:
        config = gguf.config_from_gguf(metadata, weights)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{path}: {error}") from None
    model = from_config(config)
    assign_weights(model, weights, gguf.GGUFLlamaLayout(config), str(path), dtype)
    return model, metadata


def _load_folder(folder: Path, dtype: Optional[mx.Dtype]) -> CausalLM:
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
    check_positive_fields(hf_dict, POSITIVE_HF_FIELDS, str(config_path))
    for nested in ("rope_scaling", "rope_parameters"):
        if isinstance(hf_dict.get(nested), dict):
            check_positive_fields(hf_dict[nested], ("factor", "rope_theta"), f"{config_path} {nested}")
    try:
        config = hf.config_from_hf(hf_dict)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{config_path}: {error}") from None
    weights = read_safetensors_folder(folder)
    model = from_config(config)
    assign_weights(model, weights, hf.layout(config, list(weights)), str(folder), dtype)
    return model


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    safetensors.check_file(path)  # bounds-checked header first: MLX's reader trusts the file
    try:
        return mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: cannot read safetensors file ({error}); it may be truncated or corrupt") from None


def read_safetensors_folder(folder: Path) -> dict[str, mx.array]:
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
        check_finite(tensors, lambda name: str(file))
        for name, array in tensors.items():
            if name in weights:
                raise ValueError(f"tensor {name!r} appears in both {origin[name]} and {file.name}")
            weights[name], origin[name] = array, file.name
    for name, shard in (weight_map or {}).items():
        if origin.get(name) != shard:
            raise ValueError(f"{index_path} says tensor {name!r} is in {shard}, but it is not there")
    return weights
