"""ALiBi: no position embedding; each head penalises attention linearly in key distance."""

from __future__ import annotations

import math

import mlx.core as mx

from .base import Positional
from .registry import register


def alibi_slopes(n_heads: int) -> list[float]:
    """The slopes of Press et al. (2022) for any head count.

    For a power of two n: 2^(-8/n), 2^(-16/n), ... For other n: the slopes of the closest
    smaller power of two, then every other slope of the next power of two.
    """
    if n_heads < 1:
        raise ValueError(f"alibi needs at least one head, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return slopes


@register("alibi")
class ALiBi(Positional):
    """bias[h, q, k] = -slope_h * (position_q - position_k), from absolute positions."""

    uses_bias = True

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self._slopes = mx.array(alibi_slopes(n_heads), dtype=mx.float32)[:, None, None]

    @classmethod
    def from_config(cls, config) -> "ALiBi":
        return cls(config.n_heads)

    def bias(self, q_positions, k_positions):
        distance = q_positions[..., :, None] - k_positions[..., None, :]  # [Lq, Lk] or [B, Lq, Lk]
        if distance.ndim == 3:
            distance = distance[:, None]  # [B, 1, Lq, Lk]
        return -self._slopes * distance.astype(mx.float32)  # [Hq, Lq, Lk] or [B, Hq, Lq, Lk]
