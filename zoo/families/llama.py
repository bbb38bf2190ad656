"""Llama: pre-RMSNorm blocks, separate q/k/v projections, SwiGLU MLP, RoPE by default.

Module names follow HF's LlamaForCausalLM (model.layers.N.self_attn.q_proj, ...), so a
checkpoint loads with no renaming. The HF config.json mapping and the mlx-lm twin live here too.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

import positional

from positional.rope import llama3_scaling

from ..checkpoints.gguf import interleaved_to_halves
from ..checkpoints.hf import field, require
from ..checkpoints.layout import CheckpointLayout
from ..config import ModelConfig
from ..layers import Context, attend, merge_heads, split_heads
from ..model import CausalLM
from ..registry import register_family


# -- HF transformers checkpoints ------------------------------------------------------------

def _rope_scale(hf: dict[str, Any]) -> tuple[float, float, Optional[dict[str, Any]]]:
    """(rope_theta, position scale, llama3 scaling or None) from either `rope_parameters`
    (transformers >= 5) or the older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, 1.0, None
    if kind == "linear":
        factor = scaling.get("factor")
        require(isinstance(factor, (int, float)) and factor > 0,
                 f"linear rope scaling needs a positive 'factor', got {factor!r}")
        return theta, 1.0 / float(factor), None
    if kind == "llama3":
        return theta, 1.0, llama3_scaling(scaling)
    raise ValueError(f"llama rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json."""
    activation = hf.get("hidden_act", "silu")
    require(activation == "silu", f"llama hidden_act {activation!r} is not supported (supported: silu)")
    n_heads = int(field(hf, "num_attention_heads", "llama"))
    d_model = int(field(hf, "hidden_size", "llama"))
    rope_base, rope_scale, rope_scaling = _rope_scale(hf)
    return ModelConfig(
        family="llama",
        vocab_size=int(field(hf, "vocab_size", "llama")),
        d_model=d_model,
        n_layers=int(field(hf, "num_hidden_layers", "llama")),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(field(hf, "intermediate_size", "llama")),
        positional="rope",
        max_positions=int(hf.get("max_position_embeddings") or 2048),
        rope_base=rope_base,
        rope_traditional=bool(hf.get("rope_traditional", False)),  # mlx-lm's extension
        rope_scale=rope_scale,
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def rope_scaling_field(cfg: ModelConfig) -> Optional[dict[str, Any]]:
    """The `rope_scaling` entry of an HF/mlx-lm llama config for `cfg`: None, linear, or llama3."""
    if cfg.rope_scaling is not None:
        require(cfg.rope_scale == 1.0, "HF llama cannot combine linear and llama3 rope scaling")
        return {"rope_type": "llama3", **cfg.rope_scaling}
    if cfg.rope_scale != 1.0:
        return {"type": "linear", "rope_type": "linear", "factor": 1.0 / cfg.rope_scale}
    return None


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of a LlamaForCausalLM equal to `cfg`, or ValueError.

    RoPE is written in both spellings: `rope_theta`/`rope_scaling` (read by older transformers
    and mlx-lm) and `rope_parameters` (transformers >= 5).
    """
    require(cfg.positional == "rope", f"HF llama has rope positions only, this model uses {cfg.positional!r}")
    scaling = rope_scaling_field(cfg)
    params = {"rope_theta": cfg.rope_base, **(scaling or {"rope_type": "default"})}
    params.pop("type", None)
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
        hidden_act="silu", max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base, rope_scaling=scaling, rope_parameters=params,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
    )


class LlamaLayout(CheckpointLayout):
    """HF Llama tensors. A model with llama.cpp's RoPE pairing (rope_traditional) is written
    with its q/k rows in HF's order, so HF's rotation gives the same attention."""

    def __init__(self, config: ModelConfig):
        self.config = config

    def model_name(self, file_name: str) -> Optional[str]:
        if file_name.endswith("rotary_emb.inv_freq"):
            return None  # a buffer, recomputed from rope_theta
        if file_name == "lm_head.weight" and self.config.tie_embeddings:
            return None
        return file_name

    def to_file(self, name, array):
        if self.config.rope_traditional:
            if ".self_attn.q_proj." in name:
                return interleaved_to_halves(array, self.config.n_heads)
            if ".self_attn.k_proj." in name:
                return interleaved_to_halves(array, self.config.n_kv_heads)
        return array


# -- the model ------------------------------------------------------------------------------


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

    # -- checkpoints and twins (see CausalLM) ----------------------------------------------

    hf_model_types = ("llama",)
    config_from_hf = staticmethod(config_from_hf)
    hf_config = staticmethod(hf_config)

    @staticmethod
    def hf_layout(cfg: ModelConfig, file_names: Optional[list[str]] = None) -> CheckpointLayout:
        return LlamaLayout(cfg)

    @staticmethod
    def mlx_lm_config(cfg: ModelConfig) -> dict[str, Any]:
        if cfg.positional != "rope":
            raise ValueError("mlx-lm's llama supports only rope positions")
        return dict(model_type="llama", hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                    intermediate_size=cfg.d_ff, num_attention_heads=cfg.n_heads,
                    num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                    rms_norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size,
                    max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_base,
                    rope_traditional=cfg.rope_traditional, rope_scaling=rope_scaling_field(cfg),
                    tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
                    mlp_bias=cfg.mlp_bias)
