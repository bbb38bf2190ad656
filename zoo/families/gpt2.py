"""GPT-2: pre-LayerNorm blocks, fused QKV projection, GELU MLP, learned positions by default.

Module names follow HF's GPT2LMHeadModel (transformer.h.N.attn.c_attn, ...), so a checkpoint
loads with no renaming; only Conv1D weights need transposing (GPT2Layout below). The HF
config.json mapping and the mlx-lm twin live here too, so adding a family touches one file.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

import positional

from ..checkpoints.hf import field, require
from ..checkpoints.layout import CheckpointLayout
from ..config import ModelConfig
from ..layers import Context, attend, merge_heads, split_heads
from ..model import CausalLM
from ..registry import register_family


# -- HF transformers checkpoints ------------------------------------------------------------

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation, nn.gelu_approx
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a GPT2LMHeadModel config.json."""
    activation = hf.get("activation_function", "gelu_new")
    require(activation in GPT2_ACTIVATIONS,
             f"gpt2 activation_function {activation!r} is not supported (supported: {', '.join(GPT2_ACTIVATIONS)})")
    require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
             "gpt2 attention must be scaled by 1/sqrt(head_dim) only: scale_attn_weights=false and "
             "scale_attn_by_inverse_layer_idx=true are not supported")
    d_model = int(field(hf, "n_embd", "gpt2"))
    return ModelConfig(
        family="gpt2",
        vocab_size=int(field(hf, "vocab_size", "gpt2")),
        d_model=d_model,
        n_layers=int(field(hf, "n_layer", "gpt2")),
        n_heads=int(field(hf, "n_head", "gpt2")),
        d_ff=int(hf.get("n_inner") or 4 * d_model),
        positional="learned",
        max_positions=int(field(hf, "n_positions", "gpt2", "n_ctx")),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True,
        mlp_bias=True,
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of a GPT2LMHeadModel equal to `cfg`, or ValueError."""
    require(cfg.positional == "learned", f"HF gpt2 has learned positions only, this model uses {cfg.positional!r}")
    require(cfg.n_kv_heads == cfg.n_heads, f"HF gpt2 has no grouped-query attention ({cfg.layout} here)")
    require(cfg.head_dim * cfg.n_heads == cfg.d_model,
             f"HF gpt2 needs head_dim * n_heads == d_model, got {cfg.head_dim} * {cfg.n_heads} != {cfg.d_model}")
    require(cfg.attention_bias and cfg.mlp_bias, "HF gpt2 always has attention and MLP biases")
    require(cfg.rope_scale == 1.0, "rope_scale does not apply to gpt2")
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
        n_positions=cfg.max_positions, n_ctx=cfg.max_positions, layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new", scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=cfg.tie_embeddings,
        # GPT2Config defaults both to 50256 (GPT-2's <|endoftext|>); not a token of a smaller vocabulary.
        **({} if cfg.vocab_size > 50256 else dict(bos_token_id=None, eos_token_id=None)),
    )


class GPT2Layout(CheckpointLayout):
    """HF GPT-2 tensors: Conv1D weights [in, out]; `transformer.` prefix optional."""

    def __init__(self, config: ModelConfig, prefixed: bool = False):
        self.config, self.prefixed = config, prefixed

    def model_name(self, file_name: str) -> Optional[str]:
        if file_name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # the causal-mask buffers of old checkpoints
        if file_name == "lm_head.weight":
            return None if self.config.tie_embeddings else file_name
        return file_name if file_name.startswith("transformer.") else "transformer." + file_name

    def file_name(self, name: str) -> str:
        return name if self.prefixed or not name.startswith("transformer.") else name[len("transformer."):]

    def file_shape(self, name, shape):
        return tuple(reversed(shape)) if name.endswith(CONV1D) else shape

    def from_file(self, name, array):
        return array.T if name.endswith(CONV1D) else array

    to_file = from_file


# -- the model ------------------------------------------------------------------------------


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

    # -- checkpoints and twins (see CausalLM) ----------------------------------------------

    hf_model_types = ("gpt2",)
    config_from_hf = staticmethod(config_from_hf)
    hf_config = staticmethod(hf_config)

    @staticmethod
    def hf_layout(cfg: ModelConfig, file_names: Optional[list[str]] = None) -> CheckpointLayout:
        return GPT2Layout(cfg, prefixed=any(n.startswith("transformer.") for n in file_names or []))

    @staticmethod
    def mlx_lm_config(cfg: ModelConfig) -> dict[str, Any]:
        if cfg.positional != "learned" or cfg.n_kv_heads != cfg.n_heads:
            raise ValueError("mlx-lm's gpt2 supports only learned positions and MHA")
        if cfg.head_dim * cfg.n_heads != cfg.d_model or cfg.d_ff != 4 * cfg.d_model:
            raise ValueError("mlx-lm's gpt2 needs head_dim * n_heads == d_model and d_ff == 4 * d_model")
        if not (cfg.tie_embeddings and cfg.attention_bias and cfg.mlp_bias):
            raise ValueError("mlx-lm's gpt2 needs tied embeddings and biases")
        return dict(model_type="gpt2", n_ctx=cfg.max_positions, n_embd=cfg.d_model,
                    n_head=cfg.n_heads, n_layer=cfg.n_layers, n_positions=cfg.max_positions,
                    layer_norm_epsilon=cfg.norm_eps, vocab_size=cfg.vocab_size)

    @staticmethod
    def mlx_lm_name(name: str) -> str:
        return "model." + name.removeprefix("transformer.")  # ours: transformer.*; mlx-lm: model.*
