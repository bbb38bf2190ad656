"""Model families by name, their default configs and presets, and `build`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx

from kvzoo.registry import Registry

from .config import BLOCK_CHOICES, ModelConfig, field_names
from .init import init_weights

FAMILIES: Registry[type] = Registry("model family", plural="families")


def register_family(
    name: str, *, defaults: dict[str, Any], presets: Optional[dict[str, dict[str, Any]]] = None
) -> Callable[[type], type]:
    """Class decorator: make a CausalLM subclass buildable as `name`.

    `defaults` fill config fields the caller leaves out; `presets` are named sets of overrides
    (the first preset is the family's default shape).
    """

    def add(cls: type) -> type:
        FAMILIES.add(name, cls, defaults=dict(defaults), presets=dict(presets or {}))
        cls.family = name
        return cls

    return add


def available() -> list[str]:
    """Names of all registered model families."""
    return FAMILIES.available()


def family_class(name: str) -> type:
    """The CausalLM subclass registered as `name`."""
    return FAMILIES.get(name)


def family_classes() -> list[type]:
    """Every registered family class, by name."""
    return [cls for _, cls in FAMILIES.items()]


def _family(name: str) -> dict[str, Any]:
    return {"cls": FAMILIES.get(name), **FAMILIES.entry(name)}


def presets(family: str) -> list[str]:
    """Preset names of a family."""
    return list(_family(family)["presets"])


def make_config(family: str, *, preset: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """The config of `family`: its defaults, then the preset, then `overrides`."""
    entry = _family(family)
    if preset is not None and preset not in entry["presets"]:
        raise ValueError(
            f"unknown preset {preset!r} for family {family!r}; presets: {', '.join(entry['presets'])}"
        )
    unknown = sorted(set(overrides) - set(field_names().split(", ")) - {"family"})
    if unknown:
        raise TypeError(f"unknown config field(s) {unknown}; fields: {field_names()}")
    values = {**entry["defaults"], **entry["presets"].get(preset, {}), **overrides}
    return ModelConfig(family=family, **values)


def complete_config(config: ModelConfig) -> ModelConfig:
    """`config` with the block choices it leaves to the family (None: norm, activation, MLP
    gating, biases) taken from the family's registered defaults. Families call it first."""
    defaults = _family(config.family)["defaults"]
    missing = {name: defaults.get(name) for name in BLOCK_CHOICES if getattr(config, name) is None}
    unset = sorted(name for name, value in missing.items() if value is None)
    if unset:
        raise ValueError(f"family {config.family!r} registers no default for {unset}; "
                         f"set them in the config or in register_family(defaults=...)")
    return config.replace(**missing) if missing else config


def from_config(config: ModelConfig) -> Any:
    """An uninitialised model of the family named in `config`, in eval mode (no dropout;
    `model.train()` turns dropout on)."""
    model = _family(config.family)["cls"](config)
    model.eval()
    return model


def build(
    family: str,
    *,
    preset: Optional[str] = None,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
    **overrides: Any,
) -> Any:
    """A randomly initialised model: `build("llama", preset="tiny", positional="alibi")`."""
    model = from_config(make_config(family, preset=preset, **overrides))
    init_weights(model, seed=seed, std=model.config.init_std)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model
