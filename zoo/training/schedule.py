"""Learning-rate schedule in plain Python: linear warmup, then cosine decay to min_lr.

Computed on the host each step and handed to the compiled step as a number, never as an MLX
graph evaluated per step (which cost GPT-2-in-MLX a third of its throughput).
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The rate for optimizer step `step` (0-based) of `total`: lr * (step + 1) / warmup during
    warmup, then a cosine from lr down to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = max(total - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
