"""HF transformers checkpoints: find the family of a config.json and map it both ways.

Each family file (zoo/families/) says which HF `model_type`s it reads (`hf_model_types`) and
provides `config_from_hf`, `hf_config` and `hf_layout`; this module only dispatches, so
`zoo.save` writes what `zoo.load_model` and transformers' `from_pretrained` read.
"""

from __future__ import annotations

from typing import Any, Optional

from ..config import ModelConfig
from .layout import CheckpointLayout


def field(hf: dict[str, Any], key: str, model_type: str, *alternatives: str) -> Any:
    """hf[key] (or the first alternative present); a missing field is a ValueError naming it."""
    for k in (key, *alternatives):
        if hf.get(k) is not None:
            return hf[k]
    raise ValueError(f"config.json is missing {key!r}, which a {model_type} model needs")


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


# -- models HF cannot express (ALiBi, GPT-2 with RoPE or GQA, ...) --------------------------

NATIVE = "kvzoo"  # config.json model_type of a folder whose config is kvzoo's own ModelConfig


def native_config(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig stored under `kvzoo_config` in a native (model_type "kvzoo") config.json."""
    values = hf.get("kvzoo_config")
    if not isinstance(values, dict):
        raise ValueError("config.json with model_type 'kvzoo' needs a 'kvzoo_config' object "
                         "(the model's ModelConfig fields)")
    try:
        return ModelConfig(**values)
    except TypeError as error:
        raise ValueError(f"config.json kvzoo_config: {error}") from None


# -- dispatch by family ---------------------------------------------------------------------


def _hf_families() -> dict[str, type]:
    """HF model_type -> the registered family class that reads it."""
    from ..registry import family_classes

    return {t: cls for cls in family_classes() for t in getattr(cls, "hf_model_types", ())}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict, by its model_type."""
    families = _hf_families()
    model_type = hf.get("model_type")
    if model_type == NATIVE:
        return native_config(hf)
    if model_type is None:
        raise ValueError(f"config.json is missing 'model_type' (supported: {', '.join(sorted(families))})")
    if model_type not in families:
        raise ValueError(f"unsupported model_type {model_type!r}; kvzoo loads: {', '.join(sorted(families))}")
    if hf.get("quantization_config"):
        raise ValueError("quantized checkpoints (config.json has quantization_config) are not supported")
    return families[model_type].config_from_hf(hf)


def _family_class(cfg: ModelConfig) -> type:
    from ..registry import family_class

    cls = family_class(cfg.family)
    if not getattr(cls, "hf_model_types", ()):
        have = ", ".join(sorted({c.family for c in _hf_families().values()}))
        raise ValueError(f"family {cfg.family!r} has no HF transformers equivalent (have: {have})")
    return cls


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for a model with config `cfg`, or ValueError if HF cannot express it."""
    return _family_class(cfg).hf_config(cfg)


def layout(cfg: ModelConfig, file_names: Optional[list[str]] = None) -> CheckpointLayout:
    """The tensor layout of HF checkpoints of `cfg`'s family (file_names: what a file holds)."""
    return _family_class(cfg).hf_layout(cfg, file_names)
