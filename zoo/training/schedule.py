"""Learning-rate schedule in plain Python: linear warmup, then cosine decay to min_lr.

The same curve as transformers' get_cosine_with_min_lr_schedule_with_warmup (tested against
it). Computed on the host each step and handed to the compiled step as a number, never as an
MLX graph evaluated per step (which cost GPT-2-in-MLX a third of its throughput).
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The rate for optimizer step `step` (0-based) of `total`: lr * step / warmup during the
    warmup, then a cosine from lr at step `warmup` to min_lr at step `total`."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
