"""The next-token loss: a window's first block_size tokens predict its last block_size."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def split_window(windows: mx.array) -> tuple[mx.array, mx.array]:
    """windows [B, T + 1] -> (inputs [B, T], targets [B, T]): target i is the token after input i."""
    return windows[:, :-1], windows[:, 1:]


def token_losses(model: nn.Module, windows: mx.array) -> mx.array:
    """Cross-entropy [B, T] of each prediction: term i scores input i's logits on target i."""
    inputs, targets = split_window(windows)
    logits = model(inputs, check_tokens=False)  # [B, T, V]
    return nn.losses.cross_entropy(logits, targets)


def lm_loss(model: nn.Module, windows: mx.array) -> mx.array:
    """Mean cross-entropy of predicting each next token of `windows` [B, T + 1] (a scalar)."""
    return mx.mean(token_losses(model, windows))
