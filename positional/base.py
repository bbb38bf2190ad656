"""The positional-scheme protocol: three hooks, each a no-op unless a scheme needs it.

Positions are absolute token positions computed once at the top of the model from the cache
offset and passed down; a scheme never derives them from the shape of its input.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn


class Positional(nn.Module):
    """Base class of positional schemes. Override only the hook the scheme needs."""

    name: str = ""  # set by positional.register
    max_positions: Optional[int] = None  # a learned table's size; None means unbounded
    uses_bias: bool = False  # True when `bias` returns an attention bias

    def embed(self, h: mx.array, positions: mx.array) -> mx.array:
        """Add position information to token embeddings h [B, L, d] (learned absolute)."""
        return h

    def rotate(
        self, queries: mx.array, keys: mx.array, positions: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Rotate queries [B, Hq, L, D] and keys [B, Hkv, L, D] by their positions (RoPE).

        `positions` [L] (or [B, L], each row's own) is contiguous: positions[..., 0] + arange(L).
        """
        return queries, keys

    def bias(self, q_positions: mx.array, k_positions: mx.array) -> Optional[mx.array]:
        """Additive attention bias [Hq, Lq, Lk] from absolute positions (ALiBi)."""
        return None

    def check_positions(self, offset: int, length: int) -> None:
        """Raise if positions offset..offset+length-1 are outside what the scheme supports."""
        limit = self.max_positions
        if limit is not None and offset + length > limit:
            raise ValueError(
                f"position {offset + length - 1} is past the {self.name or 'learned'} position "
                f"table of {limit} positions (0..{limit - 1}); this model cannot attend that far. "
                f"Use a shorter sequence, or a scheme without a limit (rope, alibi)"
            )
