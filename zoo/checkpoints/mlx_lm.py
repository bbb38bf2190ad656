"""The same weights in mlx-lm's own model classes, for parity tests and side-by-side benchmarks."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..model import CausalLM


def mlx_lm_args(model: CausalLM) -> dict[str, Any]:
    """The mlx-lm config (as a HF-style dict) equivalent to `model`'s, or ValueError."""
    mapping = getattr(type(model), "mlx_lm_config", None)
    if mapping is None:
        raise ValueError(f"no mlx-lm counterpart for family {model.config.family!r}")
    return mapping(model.config)


def to_mlx_lm(model: CausalLM) -> Any:
    """An mlx-lm model holding the same weight arrays as `model` (no copy)."""
    from mlx_lm.utils import _get_classes

    args = mlx_lm_args(model)
    model_class, args_class = _get_classes(args)
    twin = model_class(args_class.from_dict(args))
    rename = getattr(type(model), "mlx_lm_name", lambda name: name)
    weights = {rename(k): v for k, v in tree_flatten(model.parameters())}
    twin.update(tree_unflatten(list(weights.items())))
    missing = {k for k, _ in tree_flatten(twin.parameters())} - set(weights)
    if missing:
        raise ValueError(f"mlx-lm model has parameters kvzoo did not provide: {sorted(missing)[:5]}")
    mx.eval(twin.parameters())
    return twin
