"""Training data: a text's token ids, a held-out split, and random windows of block_size + 1.

Each batch is drawn from its own generator seeded by (seed, step), so a resumed run sees the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class TokenData:
    """Token ids split into a training part and a held-out tail (the last `val_fraction`)."""

    train: np.ndarray  # int32 [N_train]
    val: np.ndarray  # int32 [N_val], may be empty

    @classmethod
    def from_ids(cls, ids: list[int] | np.ndarray, *, val_fraction: float, block_size: int) -> "TokenData":
        """Split `ids`; both parts must hold at least one window of block_size + 1 tokens
        (the validation part only when val_fraction > 0)."""
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        ids = np.asarray(ids, dtype=np.int32)
        n_val = int(len(ids) * val_fraction)
        train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
        need = block_size + 1
        if len(train) < need or (val_fraction > 0 and len(val) < need):
            raise ValueError(
                f"the text has {len(ids)} tokens: {len(train)} for training and {len(val)} held out, "
                f"but each part needs at least block_size + 1 = {need}; use a longer text, a smaller "
                f"--block-size or a different --val-fraction"
            )
        return cls(train, val)


def random_windows(ids: np.ndarray, batch_size: int, block_size: int, seed: int, step: int) -> mx.array:
    """[batch_size, block_size + 1] windows of `ids` at random starts (inputs are [:, :-1],
    targets [:, 1:]); the same (seed, step) always gives the same windows."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)  # last start: len - block - 1
    index = starts[:, None] + np.arange(block_size + 1)[None, :]  # [B, T + 1]
    return mx.array(ids[index])
