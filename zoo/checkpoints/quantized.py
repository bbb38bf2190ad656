"""MLX-quantized weights: the folders `mlx_lm.convert --quantize` writes, read and written.

Such a folder is an HF-style folder whose config.json carries
`quantization: {group_size, bits[, mode]}` (mlx-lm copies it to `quantization_config`), and
whose quantized layers store three tensors instead of a weight: `x.weight` (uint32, `bits`
values packed per 32 bits), `x.scales` and `x.biases` (one per group of `group_size` inputs),
as `mx.quantize` makes them. kvzoo loads them into `nn.QuantizedLinear` and
`nn.QuantizedEmbedding` exactly as mlx-lm does: a layer is quantized when the file holds its
`scales`. A quantized tensor whose module has no quantized form (GPT-2's learned position
table, which mlx-lm stores as a quantized embedding) is dequantized into the float table:
`QuantizedEmbedding` looks rows up by dequantizing them, so the values are the same.

    model = zoo.load_model("mlx-community-folder")           # QuantizedLinear layers inside
    quantize(model, bits=4, group_size=64)                   # what `kvzoo convert` does
    save_quantized(model, "out/")                            # read by zoo.load and mlx_lm.load
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .layout import CheckpointLayout

BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode packs
GROUP_SIZES = (32, 64, 128)
QUANTIZATION_KEYS = ("group_size", "bits", "mode")


def check_settings(bits: Any, group_size: Any) -> None:
    """ValueError unless (bits, group_size) is an affine setting mx.quantize supports."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"quantization group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                         f"got {group_size!r}")


def read_quantization(hf: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The `quantization` entry of an mlx-lm config.json (None when the weights are float), checked.

    Takes it out of `hf` together with mlx-lm's copy under `quantization_config`, so what is
    left is an ordinary HF config. Per-layer entries (mlx-lm's mixed recipes: a layer path
    mapped to its own {group_size, bits} or to false) are kept and checked too. HF's own
    quantized formats (a `quantization_config` with a `quant_method`: GPTQ, AWQ, bitsandbytes)
    are refused by name.
    """
    quantization = hf.pop("quantization", None)
    copy = hf.pop("quantization_config", None)
    if quantization is None:
        if copy:
            method = copy.get("quant_method", "unknown") if isinstance(copy, dict) else "unknown"
            hf["quantization_config"] = copy  # put back: the caller's error names it
            raise ValueError(
                f"quantized checkpoints in HF's {method!r} format (config.json quantization_config) are "
                f"not supported; kvzoo reads MLX-quantized folders (config.json 'quantization': "
                f"{{group_size, bits}}, as mlx_lm.convert --quantize writes) and float weights"
            )
        return None
    if not isinstance(quantization, dict):
        raise ValueError(f"config.json 'quantization' must be an object {{group_size, bits}}, got {quantization!r}")
    for key in ("group_size", "bits"):
        if key not in quantization:
            raise ValueError(f"config.json 'quantization' is missing {key!r} (it has {sorted(quantization)})")
    for where, settings in [("", quantization)] + [
            (f" for layer {k!r}", v) for k, v in quantization.items() if isinstance(v, dict)]:
        mode = settings.get("mode", "affine")
        if mode != "affine":
            raise ValueError(f"config.json quantization mode {mode!r}{where} is not supported (supported: affine)")
        check_settings(settings.get("bits"), settings.get("group_size"))
    for key, value in quantization.items():
        if key not in QUANTIZATION_KEYS and not isinstance(value, (dict, bool)):
            raise ValueError(f"config.json 'quantization' entry {key!r} must be a layer's settings "
                             f"(an object) or false, got {value!r}")
    return quantization


def quantize_from_file(model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array],
                       layout: CheckpointLayout) -> dict[str, mx.array]:
    """Quantize the layers of `model` that `weights` stores quantized, as mlx-lm's loader does.

    A module becomes quantized when the file holds `<its weight's file stem>.scales`. Returns
    `weights` with the quantized tensors of modules that have no quantized form dequantized
    into the float tensor they stand for.
    """
    scaled = {name.removesuffix(".scales") for name in weights if name.endswith(".scales")}

    def file_stem(path: str) -> str:
        return layout.file_name(path + ".weight").removesuffix(".weight")

    def predicate(path: str, module: nn.Module) -> Union[bool, dict]:
        stem = file_stem(path)
        if stem not in scaled or not hasattr(module, "to_quantized"):
            return False
        layer = quantization.get(path, quantization.get(stem))
        if isinstance(layer, dict):
            return {"group_size": layer["group_size"], "bits": layer["bits"]}
        return _inferred(stem, module, weights, quantization)

    quantized: set[str] = set()

    def record(path: str, module: nn.Module) -> Union[bool, dict]:
        answer = predicate(path, module)
        if answer:
            quantized.add(file_stem(path))
        return answer

    nn.quantize(model, quantization["group_size"], quantization["bits"], class_predicate=record)
    out = dict(weights)
    for stem in sorted(scaled - quantized):  # stored quantized, but the module has no quantized form
        if f"{stem}.weight" not in weights or f"{stem}.biases" not in weights:
            raise ValueError(f"tensor {stem + '.scales'!r} has no {stem + '.weight'!r} and "
                             f"{stem + '.biases'!r} beside it; the folder is incomplete")
        w, scales, biases = out.pop(f"{stem}.weight"), out.pop(f"{stem}.scales"), out.pop(f"{stem}.biases")
        bits = w.shape[-1] * 32 // (scales.shape[-1] * quantization["group_size"])
        settings = quantization.get(stem) if isinstance(quantization.get(stem), dict) else dict(
            group_size=quantization["group_size"], bits=bits)
        out[f"{stem}.weight"] = mx.dequantize(w, scales, biases, group_size=settings["group_size"],
                                              bits=settings["bits"])
    return out


def _inferred(stem: str, module: nn.Module, weights: dict[str, mx.array], quantization: dict[str, Any]) -> dict:
    """{group_size, bits} of a stored layer from its shapes (as mlx-lm's infer_quant_config), so a
    layer written with other settings than the default (mlx-lm's mixed recipes) loads right."""
    in_dims = module.weight.shape[-1]
    scales, packed = weights[f"{stem}.scales"], weights.get(f"{stem}.weight")
    if packed is None or scales.ndim == 0 or scales.shape[-1] == 0 or in_dims % scales.shape[-1]:
        return {"group_size": quantization["group_size"], "bits": quantization["bits"]}
    return {"group_size": in_dims // scales.shape[-1], "bits": packed.shape[-1] * 32 // in_dims}


def quantize(model: nn.Module, *, bits: int = 4, group_size: int = 64) -> nn.Module:
    """Quantize every Linear and Embedding of `model` whose input width `group_size` divides
    (the layers `mlx_lm.convert --quantize` quantizes), in place. Returns the model."""
    check_settings(bits, group_size)
    if is_quantized(model):
        raise ValueError("the model is already quantized; load its float weights to requantize")

    def predicate(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    mx.eval(model.parameters())
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` is an MLX quantized layer."""
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """config.json's `quantization` for a quantized model: the common {group_size, bits, mode},
    plus a per-layer entry for every layer quantized otherwise (as mlx-lm writes)."""
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if not layers:
        raise ValueError("the model has no quantized layers")
    settings = [(m.group_size, m.bits) for _, m in layers]
    group_size, bits = max(set(settings), key=settings.count)
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for name, m in layers:
        if (m.group_size, m.bits) != (group_size, bits):
            config[name] = {"group_size": m.group_size, "bits": m.bits, "mode": "affine"}
    return config


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters occupy (packed weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def save_quantized(model: nn.Module, path: Union[str, Path], layout: CheckpointLayout,
                   config: dict[str, Any]) -> Path:
    """Write a quantized model as mlx-lm's folders are written: `config` (an HF config.json
    dict) plus `quantization`/`quantization_config`, and model.safetensors with the file names of
    `layout` (mlx-lm's). mlx_lm.load and zoo.load read it; transformers cannot."""
    folder = Path(path)
    weights = {layout.file_name(n): v for n, v in tree_flatten(model.parameters())}
    quantization = quantization_config(model)
    config = {**config, "quantization": quantization, "quantization_config": quantization}
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return folder
