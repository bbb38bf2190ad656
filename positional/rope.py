"""Rotary position embedding (RoPE): rotate queries and keys by their absolute position."""

from __future__ import annotations

import mlx.core as mx

from .base import Positional
from .registry import register


@register("rope")
class RoPE(Positional):
    """mx.fast.rope over the first `dims` features of each head.

    base: the frequency base (10000 for Llama 1/2). traditional: True pairs consecutive
    features (x0,x1),(x2,x3)... as in the original paper and llama.cpp's GGUF layout; False
    pairs the two halves (x_i, x_{i+D/2}) as in HF checkpoints. scale: linear position scaling,
    positions are multiplied by it (1/factor for "linear" rope_scaling).
    """

    def __init__(self, dims: int, base: float = 10000.0, traditional: bool = False,
                 scale: float = 1.0) -> None:
        super().__init__()
        if dims < 2 or dims % 2:
            raise ValueError(f"rope needs an even number of rotated dims >= 2, got {dims}")
        if base <= 0 or scale <= 0:
            raise ValueError(f"rope base and scale must be positive, got base={base}, scale={scale}")
        self.dims = dims
        self.base = float(base)
        self.traditional = bool(traditional)
        self.scale = float(scale)

    @classmethod
    def from_config(cls, config) -> "RoPE":
        return cls(config.head_dim, config.rope_base, config.rope_traditional, config.rope_scale)

    def _apply(self, x: mx.array, offset: mx.array) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base,
                            scale=self.scale, offset=offset)

    def rotate(self, queries, keys, positions):
        offset = positions[..., 0]  # positions are contiguous from here
        return self._apply(queries, offset), self._apply(keys, offset)
