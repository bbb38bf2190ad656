"""GPT-2: pre-LayerNorm blocks, fused QKV projection, GELU MLP, learned positions by default.

Module names follow HF's GPT2LMHeadModel (transformer.h.N.attn.c_attn, ...), so a checkpoint
loads with no renaming; only Conv1D weights need transposing (see zoo.loading).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

import positional

from .attention import Context, attend, merge_heads, split_heads
from .config import ModelConfig
from .model import CausalLM
from .registry import register_family


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.splits = [q_dim, q_dim + kv_dim]
        self.c_attn = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.attention_bias)
        self.c_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.attention_bias)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        q, k, v = mx.split(self.c_attn(x), self.splits, axis=-1)
        q = split_heads(q, self.n_heads)  # [B, Hq, L, D]
        k = split_heads(k, self.n_kv_heads)  # [B, Hkv, L, D]
        v = split_heads(v, self.n_kv_heads)
        return self.c_proj(merge_heads(attend(q, k, v, ctx, cache, self.scale)))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(nn.gelu_approx(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        x = x + self.attn(self.ln_1(x), ctx, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = positional.make(cfg.positional, cfg)  # learned: wpe.weight [n_positions, d]
        self.h = [GPT2Block(cfg) for _ in range(cfg.n_layers)]
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


@register_family(
    "gpt2",
    defaults=dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_positions=1024,
                  positional="learned", attention_bias=True, mlp_bias=True, tie_embeddings=True),
    presets={
        "124m": {},
        "tiny": dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, head_dim=32,
                     d_ff=128, max_positions=256, init_std=0.1),
    },
)
class GPT2(CausalLM):
    """GPT-2 language model (HF names: transformer.*, lm_head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_ff is None:
            cfg = cfg.replace(d_ff=4 * cfg.d_model)
        self.config = cfg
        self.transformer = GPT2Transformer(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @property
    def layers(self) -> list:
        return self.transformer.h

    @property
    def positional(self):
        return self.transformer.wpe

    def forward(self, tokens, ctx, cache):
        t = self.transformer
        h = ctx.positional.embed(t.wte(tokens), ctx.positions)
        for block, layer_cache in zip(t.h, cache):
            h = block(h, ctx, layer_cache)
        h = t.ln_f(h)
        return t.wte.as_linear(h) if self.config.tie_embeddings else self.lm_head(h)
