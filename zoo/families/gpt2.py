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

from .. import blocks
from ..checkpoints.hf import field, require
from ..checkpoints.layout import CheckpointLayout
from ..config import ModelConfig
from ..layers import Context, attend, merge_heads, split_heads
from ..model import CausalLM
from ..registry import complete_config, register_family


# -- HF transformers checkpoints ------------------------------------------------------------

# HF activation_function -> kvzoo activation. "gelu" is the exact erf form (nanoGPT, minGPT).
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                    "relu": "relu", "silu": "silu", "swish": "silu"}
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
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
        norm="layernorm",
        activation=GPT2_ACTIVATIONS[activation],
        gated_mlp=False,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of a GPT2LMHeadModel equal to `cfg`, or ValueError naming what HF's
    GPT-2 cannot express."""
    require(cfg.positional == "learned", f"HF gpt2 has learned positions only, this model uses {cfg.positional!r}")
    require(cfg.n_kv_heads == cfg.n_heads, f"HF gpt2 has no grouped-query attention ({cfg.layout} here)")
    require(cfg.head_dim * cfg.n_heads == cfg.d_model,
             f"HF gpt2 needs head_dim * n_heads == d_model, got {cfg.head_dim} * {cfg.n_heads} != {cfg.d_model}")
    require(cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias,
             "HF gpt2 always has attention and MLP biases (this model lacks "
             + ", ".join(n for n in ("qkv_bias", "out_bias", "mlp_bias") if not getattr(cfg, n)) + ")")
    require(not cfg.head_bias, "HF gpt2 has no LM head bias (head_bias=True here)")
    require(cfg.norm == "layernorm", f"HF gpt2 has LayerNorm only, this model uses {cfg.norm!r}")
    require(not cfg.gated_mlp, "HF gpt2 has no gated MLP (gated_mlp=True here)")
    require(cfg.sliding_window is None, "HF gpt2 has no sliding-window attention")
    require(cfg.rope_scale == 1.0, "rope_scale does not apply to gpt2")
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
        n_positions=cfg.max_positions, n_ctx=cfg.max_positions, layer_norm_epsilon=cfg.norm_eps,
        activation_function=HF_ACTIVATION[cfg.activation], scale_attn_weights=True,
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


class GPT2MLXLayout(CheckpointLayout):
    """GPT-2 as mlx-lm writes it (mlx_lm.convert): `model.` instead of `transformer.`, every
    weight already in nn.Linear's [out, in] layout (so quantized blocks load as they are)."""

    def __init__(self, config: ModelConfig):
        self.config = config

    def model_name(self, file_name: str) -> Optional[str]:
        if file_name == "lm_head.weight" and self.config.tie_embeddings:
            return None
        return "transformer." + file_name.removeprefix("model.") if file_name.startswith("model.") else file_name

    def file_name(self, name: str) -> str:
        return GPT2.mlx_lm_name(name)


# -- the model ------------------------------------------------------------------------------


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.splits = [q_dim, q_dim + kv_dim]
        self.c_attn = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        self.resid_dropout = blocks.make_dropout(cfg)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        q, k, v = mx.split(self.c_attn(x), self.splits, axis=-1)
        q = split_heads(q, self.n_heads)  # [B, Hq, L, D]
        k = split_heads(k, self.n_kv_heads)  # [B, Hkv, L, D]
        v = split_heads(v, self.n_kv_heads)
        return self.resid_dropout(self.c_proj(merge_heads(attend(q, k, v, ctx, cache, self.scale))))


class GPT2MLP(nn.Module):
    """act(c_fc(x)) -> c_proj; gated (not in HF's GPT-2): act(c_gate(x)) * c_fc(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        if cfg.gated_mlp:
            self.c_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = blocks.activation(cfg.activation)
        self.training_act = blocks.training_activation(cfg.activation)
        self.dropout = blocks.make_dropout(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        act = self.training_act if self.training else self.act  # training: blocks.TRAINING_ACTIVATIONS
        return self.dropout(self.c_proj(blocks.mlp_hidden(act, self.c_fc, self.get("c_gate"), x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = blocks.make_norm(cfg)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = blocks.make_norm(cfg)
        self.mlp = GPT2MLP(cfg)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        x = x + self.attn(self.ln_1(x), ctx, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = positional.make(cfg.positional, cfg)  # learned: wpe.weight [n_positions, d]
        self.drop = blocks.make_dropout(cfg)
        self.h = [GPT2Block(cfg) for _ in range(cfg.n_layers)]
        self.ln_f = blocks.make_norm(cfg)


@register_family(
    "gpt2",
    defaults=dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_positions=1024,
                  positional="learned", tie_embeddings=True, norm="layernorm", activation="gelu_tanh",
                  gated_mlp=False, qkv_bias=True, out_bias=True, mlp_bias=True),
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
        cfg = complete_config(cfg)
        if cfg.d_ff is None:
            cfg = cfg.replace(d_ff=4 * cfg.d_model)
        self.config = cfg
        self.transformer = GPT2Transformer(cfg)
        head = blocks.make_head(cfg)
        if head is not None:
            self.lm_head = head

    @property
    def layers(self) -> list:
        return self.transformer.h

    @property
    def positional(self):
        return self.transformer.wpe

    def forward(self, tokens, ctx, cache):
        t = self.transformer
        h = t.drop(ctx.positional.embed(t.wte(tokens), ctx.positions))
        for block, layer_cache in zip(t.h, cache):
            h = block(h, ctx, layer_cache)
        return blocks.head_logits(t.ln_f(h), t.wte, self.get("lm_head"), self.config)

    # -- checkpoints and twins (see CausalLM) ----------------------------------------------

    hf_model_types = ("gpt2",)
    config_from_hf = staticmethod(config_from_hf)
    hf_config = staticmethod(hf_config)

    @staticmethod
    def hf_layout(cfg: ModelConfig, file_names: Optional[list[str]] = None) -> CheckpointLayout:
        names = file_names or []
        if any(n.startswith("model.h.") for n in names):
            return GPT2MLXLayout(cfg)  # a folder mlx_lm.convert wrote
        return GPT2Layout(cfg, prefixed=any(n.startswith("transformer.") for n in names))

    @staticmethod
    def mlx_layout(cfg: ModelConfig) -> CheckpointLayout:
        return GPT2MLXLayout(cfg)

    @staticmethod
    def mlx_lm_config(cfg: ModelConfig) -> dict[str, Any]:
        if cfg.positional != "learned" or cfg.n_kv_heads != cfg.n_heads:
            raise ValueError("mlx-lm's gpt2 supports only learned positions and MHA")
        if cfg.head_dim * cfg.n_heads != cfg.d_model or cfg.d_ff != 4 * cfg.d_model:
            raise ValueError("mlx-lm's gpt2 needs head_dim * n_heads == d_model and d_ff == 4 * d_model")
        if not (cfg.tie_embeddings and cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias) or cfg.head_bias:
            raise ValueError("mlx-lm's gpt2 needs tied embeddings, attention and MLP biases, no head bias")
        if (cfg.norm, cfg.activation, cfg.gated_mlp, cfg.sliding_window) != ("layernorm", "gelu_tanh", False, None):
            raise ValueError("mlx-lm's gpt2 has LayerNorm, a tanh-GELU MLP and full attention only")
        return dict(model_type="gpt2", n_ctx=cfg.max_positions, n_embd=cfg.d_model,
                    n_head=cfg.n_heads, n_layer=cfg.n_layers, n_positions=cfg.max_positions,
                    layer_norm_epsilon=cfg.norm_eps, vocab_size=cfg.vocab_size)

    @staticmethod
    def mlx_lm_name(name: str) -> str:
        return "model." + name.removeprefix("transformer.")  # ours: transformer.*; mlx-lm: model.*
