"""AdamW as PyTorch runs it: bias correction on, weight decay only on matrices and embeddings
(parameters with 2 or more dimensions; biases and norm scales are not decayed, as in nanoGPT)."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim


class AdamW(optim.AdamW):
    """mlx.optimizers.AdamW with bias correction, decaying only parameters with ndim >= 2."""

    def __init__(self, learning_rate: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        super().__init__(learning_rate=learning_rate, betas=list(betas), eps=eps,
                         weight_decay=weight_decay, bias_correction=True)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)
