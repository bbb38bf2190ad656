"""Llama: pre-RMSNorm blocks, separate q/k/v projections, SwiGLU MLP, RoPE by default.

Module names follow HF's LlamaForCausalLM (model.layers.N.self_attn.q_proj, ...), so a
checkpoint loads with no renaming.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

import positional

from .attention import Context, attend, merge_heads, split_heads
from .config import ModelConfig
from .model import CausalLM
from .registry import register_family


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.scale = cfg.head_dim**-0.5
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.attention_bias)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        q = split_heads(self.q_proj(x), self.n_heads)  # [B, Hq, L, D]
        k = split_heads(self.k_proj(x), self.n_kv_heads)  # [B, Hkv, L, D]
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        return self.o_proj(merge_heads(attend(q, k, v, ctx, cache, self.scale)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = positional.make(cfg.positional, cfg)  # learned: a table; rope: none
        self.layers = [LlamaBlock(cfg) for _ in range(cfg.n_layers)]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def default_d_ff(d_model: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4*d_model, rounded up to a multiple."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@register_family(
    "llama",
    defaults=dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                  d_ff=2048, max_positions=2048, positional="rope", norm_eps=1e-5,
                  tie_embeddings=True),
    presets={
        "small": {},
        "tiny": dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=32, d_ff=128, max_positions=256, init_std=0.1),
    },
)
class Llama(CausalLM):
    """Llama-style language model (HF names: model.*, lm_head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_ff is None:
            cfg = cfg.replace(d_ff=default_d_ff(cfg.d_model))
        self.config = cfg
        self.model = LlamaBody(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @property
    def layers(self) -> list:
        return self.model.layers

    @property
    def positional(self):
        return self.model.embed_positions

    def forward(self, tokens, ctx, cache):
        m = self.model
        h = ctx.positional.embed(m.embed_tokens(tokens), ctx.positions)
        for block, layer_cache in zip(m.layers, cache):
            h = block(h, ctx, layer_cache)
        h = m.norm(h)
        return m.embed_tokens.as_linear(h) if self.config.tie_embeddings else self.lm_head(h)
