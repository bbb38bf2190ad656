"""The block's interchangeable parts, shared by every family: norms, MLP activations and
gating, the LM head (tied or not, with or without a bias).

A family decides where the parts go and what HF calls them; which part it gets is a config
choice (`ModelConfig.norm`, `activation`, `gated_mlp`, the `*_bias` flags), so any family can
be built as any hybrid: `zoo.build("gpt2", norm="rmsnorm", activation="silu", gated_mlp=True)`.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from . import fastmath
from .config import ModelConfig

# MLX's functions for each activation name. gelu is the exact erf form (nanoGPT, minGPT,
# HF "gelu"); gelu_tanh is the tanh approximation (GPT-2's "gelu_new", "gelu_pytorch_tanh").
ACTIVATION_FUNCTIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": nn.gelu,
    "gelu_tanh": nn.gelu_approx,
    "relu": nn.relu,
    "silu": nn.silu,
}


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (scale and bias) or RMSNorm (scale only) of width d_model."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    raise ValueError(f"unknown norm {cfg.norm!r} (allowed: layernorm, rmsnorm)")


def activation(name: str) -> Callable[[mx.array], mx.array]:
    """The MLP activation called `name` (see ACTIVATION_FUNCTIONS)."""
    if name not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"unknown activation {name!r} (allowed: {', '.join(ACTIVATION_FUNCTIONS)})")
    return ACTIVATION_FUNCTIONS[name]


# What the training forward (model.train(), compiled step) uses instead: the same function
# written so that MLX's CPU compiler vectorises it (zoo/fastmath.py); equal up to float rounding.
TRAINING_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {"gelu": fastmath.gelu, "silu": fastmath.silu}


def training_activation(name: str) -> Callable[[mx.array], mx.array]:
    """The MLP activation called `name` for the training forward (see TRAINING_ACTIVATIONS)."""
    return TRAINING_ACTIVATIONS.get(name) or activation(name)


def mlp_hidden(act: Callable[[mx.array], mx.array], up: nn.Module, gate: Optional[nn.Module],
               x: mx.array) -> mx.array:
    """The MLP's hidden layer [B, L, d_ff]: act(up(x)), or act(gate(x)) * up(x) when gated."""
    if gate is None:
        return act(up(x))
    return act(gate(x)) * up(x)


class TiedHeadBias(nn.Module):
    """The LM head's bias when its weight is the token embedding (HF name `lm_head.bias`)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = mx.zeros((vocab_size,))


def make_head(cfg: ModelConfig) -> Optional[nn.Module]:
    """The `lm_head` module: a Linear when untied, a bias alone when tied with head_bias,
    nothing when tied without one."""
    if not cfg.tie_embeddings:
        return nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
    return TiedHeadBias(cfg.vocab_size) if cfg.head_bias else None


def head_logits(h: mx.array, embedding: nn.Module, lm_head: Optional[nn.Module],
                cfg: ModelConfig) -> mx.array:
    """Logits [B, L, V] from the final hidden states [B, L, d_model]."""
    if not cfg.tie_embeddings:
        return lm_head(h)
    logits = embedding.as_linear(h)
    return logits + lm_head.bias if cfg.head_bias else logits


def make_dropout(cfg: ModelConfig) -> nn.Module:
    """Dropout with the config's rate: active only in training mode (`model.train()`), the
    identity in eval mode (the mode models are built in) and at rate 0. No parameters."""
    return nn.Dropout(cfg.dropout)
