"""Deterministic random initialisation, GPT-2 style, without touching MLX's global RNG."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


def init_weights(model: nn.Module, *, seed: int, std: float) -> None:
    """Normal(0, std) matrices and embeddings, zero biases, unit norm scales.

    Output projections of each block (c_proj, o_proj, down_proj) get std / sqrt(2 * n_layers)
    as in GPT-2. The same seed always gives the same weights.
    """
    norm_params = {
        f"{path}.{k}"
        for path, module in model.named_modules()
        if isinstance(module, _NORM_TYPES)
        for k in module.parameters()
    }
    n_layers = max(len(getattr(model, "layers", [])), 1)
    key = mx.random.key(seed)
    new = []
    for name, value in sorted(tree_flatten(model.parameters())):
        key, sub = mx.random.split(key)
        if name in norm_params:
            value = mx.ones_like(value) if name.endswith("weight") else mx.zeros_like(value)
        elif name.endswith("bias"):
            value = mx.zeros_like(value)
        else:
            scale = std
            if any(name.endswith(p) for p in ("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                scale = std / math.sqrt(2 * n_layers)
            value = scale * mx.random.normal(value.shape, dtype=value.dtype, key=sub)
        new.append((name, value))
    model.update(tree_unflatten(new))
