"""Learned absolute positions (GPT-2): a table of vectors added to the token embeddings."""

from __future__ import annotations

import mlx.core as mx

from .base import Positional
from .registry import register


@register("learned")
class LearnedPositional(Positional):
    """h + weight[positions]; `weight` is [max_positions, d_model] (HF name `wpe.weight`)."""

    def __init__(self, max_positions: int, dims: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.weight = mx.zeros((max_positions, dims))

    @classmethod
    def from_config(cls, config) -> "LearnedPositional":
        return cls(config.max_positions, config.d_model)

    def embed(self, h: mx.array, positions: mx.array) -> mx.array:
        if positions.ndim == 2:  # rows of a ragged batch: padding (negative) reads position 0
            positions = mx.maximum(positions, 0)
        return h + self.weight[positions]
