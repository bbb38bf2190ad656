"""Llama: pre-RMSNorm blocks, separate q/k/v projections, SwiGLU MLP, RoPE by default.

Module names follow HF's LlamaForCausalLM (model.layers.N.self_attn.q_proj, ...), so a
checkpoint loads with no renaming. The same block, names and config.json fields serve HF's
Mistral (a sliding window, no biases) and Qwen2 (q/k/v biases), so those model types are read
and written here too (SmolLM and TinyLlama are Llama checkpoints). The HF config.json mapping
and the mlx-lm twin live here too.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

import positional

from positional.rope import llama3_scaling

from .. import blocks
from ..checkpoints.gguf import interleaved_to_halves
from ..checkpoints.hf import field, require
from ..checkpoints.layout import CheckpointLayout
from ..config import ModelConfig
from ..layers import Context, attend, merge_heads, split_heads
from ..model import CausalLM
from ..registry import complete_config, register_family


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


# HF hidden_act -> kvzoo activation (transformers' ACT2FN names).
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu"}
HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
MODEL_TYPES = ("llama", "mistral", "qwen2")  # the HF model types this file reads and writes


def _sliding_window(hf: dict[str, Any], model_type: str) -> Optional[int]:
    """The window every layer applies (None: full attention), or ValueError for per-layer windows.

    Mistral: `sliding_window` (null in v0.2+). Qwen2: only with `use_sliding_window`, and then
    only from layer `max_window_layers` on (or as `layer_types` lists it); kvzoo models have
    one window for all layers, so a mixed pattern is refused.
    """
    window = hf.get("sliding_window")
    if model_type == "llama":
        return None
    if model_type == "qwen2":
        layer_types = hf.get("layer_types")
        if layer_types is None:
            n_layers = int(field(hf, "num_hidden_layers", model_type))
            windowed = hf.get("use_sliding_window", False) and window is not None
            start = int(hf.get("max_window_layers", 28))
            layer_types = ["sliding_attention" if windowed and i >= start else "full_attention"
                           for i in range(n_layers)]
        kinds = set(layer_types)
        require(kinds <= {"sliding_attention", "full_attention"}, f"qwen2 layer_types {sorted(kinds)} are not supported")
        if kinds == {"full_attention"}:
            return None
        require(kinds == {"sliding_attention"},
                 "qwen2 with a sliding window on some layers only (use_sliding_window with "
                 "max_window_layers > 0) is not supported: kvzoo applies one window to every layer")
    if window is None:
        return None
    require(isinstance(window, int) and window >= 1, f"{model_type} sliding_window must be a positive int, got {window!r}")
    return window


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM config.json.

    The three share the block (RMSNorm, gated MLP, RoPE); they differ in biases (Llama:
    `attention_bias` on q/k/v/o, `mlp_bias`; Qwen2: q/k/v only; Mistral: none) and in the
    sliding window (Mistral, and Qwen2 when every layer uses it).
    """
    model_type = hf.get("model_type", "llama")
    activation = hf.get("hidden_act", "silu")
    require(activation in HF_ACTIVATIONS,
             f"{model_type} hidden_act {activation!r} is not supported (supported: {', '.join(HF_ACTIVATIONS)})")
    n_heads = int(field(hf, "num_attention_heads", model_type))
    d_model = int(field(hf, "hidden_size", model_type))
    rope_base, rope_scale, rope_scaling = _rope_scale(hf)
    attention_bias = bool(hf.get("attention_bias", False)) if model_type == "llama" else False
    return ModelConfig(
        family="llama",
        vocab_size=int(field(hf, "vocab_size", model_type)),
        d_model=d_model,
        n_layers=int(field(hf, "num_hidden_layers", model_type)),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(field(hf, "intermediate_size", model_type)),
        positional="rope",
        max_positions=int(hf.get("max_position_embeddings") or 2048),
        rope_base=rope_base,
        rope_traditional=bool(hf.get("rope_traditional", False)),  # mlx-lm's extension
        rope_scale=rope_scale,
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm="rmsnorm",
        activation=HF_ACTIVATIONS[activation],
        gated_mlp=True,
        qkv_bias=attention_bias or model_type == "qwen2",
        out_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        sliding_window=_sliding_window(hf, model_type),
    )


def rope_scaling_field(cfg: ModelConfig) -> Optional[dict[str, Any]]:
    """The `rope_scaling` entry of an HF/mlx-lm llama config for `cfg`: None, linear, or llama3."""
    if cfg.rope_scaling is not None:
        require(cfg.rope_scale == 1.0, "HF llama cannot combine linear and llama3 rope scaling")
        return {"rope_type": "llama3", **cfg.rope_scaling}
    if cfg.rope_scale != 1.0:
        return {"type": "linear", "rope_type": "linear", "factor": 1.0 / cfg.rope_scale}
    return None


def hf_model_type(cfg: ModelConfig) -> str:
    """Which HF model type expresses `cfg`: llama (q/k/v/o biases alike, MLP bias allowed),
    qwen2 (q/k/v bias only), mistral (a sliding window, no biases); ValueError if none does."""
    require(cfg.positional == "rope", f"HF llama has rope positions only, this model uses {cfg.positional!r}")
    require(cfg.norm == "rmsnorm", f"HF llama-style models have RMSNorm only, this model uses {cfg.norm!r}")
    require(cfg.gated_mlp, "HF llama-style models have a gated MLP only (gated_mlp=False here)")
    require(not cfg.head_bias, "HF llama-style models have no LM head bias (head_bias=True here)")
    biases = (cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias)
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        require(biases == (False, False, False),
                 f"HF has no llama-style model with a sliding window and biases (qkv_bias, out_bias, "
                 f"mlp_bias) = {biases}: Mistral has none, Qwen2 q/k/v only")
        return "mistral"
    require(cfg.qkv_bias == cfg.out_bias,
             f"HF llama's attention_bias covers q/k/v and the output projection together; "
             f"qkv_bias={cfg.qkv_bias} with out_bias={cfg.out_bias} (and mlp_bias={cfg.mlp_bias}) "
             f"has no HF model type")
    return "llama"


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of a Llama, Qwen2 or Mistral model equal to `cfg` (hf_model_type),
    or ValueError naming what none of them can express.

    RoPE is written in both spellings: `rope_theta`/`rope_scaling` (read by older transformers
    and mlx-lm) and `rope_parameters` (transformers >= 5).
    """
    model_type = hf_model_type(cfg)
    scaling = rope_scaling_field(cfg)
    params = {"rope_theta": cfg.rope_base, **(scaling or {"rope_type": "default"})}
    params.pop("type", None)
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    config = dict(
        architectures=[architecture[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
        hidden_act=HF_ACTIVATION[cfg.activation], max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base, rope_scaling=scaling, rope_parameters=params,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if model_type == "llama":
        config.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "mistral":
        config.update(sliding_window=cfg.sliding_window)
    else:  # qwen2: one window for every layer, or none
        windowed = cfg.sliding_window is not None
        config.update(use_sliding_window=windowed, sliding_window=cfg.sliding_window, max_window_layers=0,
                      layer_types=[("sliding_attention" if windowed else "full_attention")] * cfg.n_layers)
    return config


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
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        self.dropout = blocks.make_dropout(cfg)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        q = split_heads(self.q_proj(x), self.n_heads)  # [B, Hq, L, D]
        k = split_heads(self.k_proj(x), self.n_kv_heads)  # [B, Hkv, L, D]
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        return self.dropout(self.o_proj(merge_heads(attend(q, k, v, ctx, cache, self.scale))))


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)) (SwiGLU with silu); ungated (not in HF's Llama): down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.gated_mlp:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = blocks.activation(cfg.activation)
        self.training_act = blocks.training_activation(cfg.activation)
        self.dropout = blocks.make_dropout(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        act = self.training_act if self.training else self.act  # training: blocks.TRAINING_ACTIVATIONS
        return self.dropout(self.down_proj(blocks.mlp_hidden(act, self.up_proj, self.get("gate_proj"), x)))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = blocks.make_norm(cfg)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = blocks.make_norm(cfg)
        self.mlp = LlamaMLP(cfg)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = positional.make(cfg.positional, cfg)  # learned: a table; rope: none
        self.dropout = blocks.make_dropout(cfg)
        self.layers = [LlamaBlock(cfg) for _ in range(cfg.n_layers)]
        self.norm = blocks.make_norm(cfg)


def default_d_ff(d_model: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4*d_model, rounded up to a multiple."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@register_family(
    "llama",
    defaults=dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                  d_ff=2048, max_positions=2048, positional="rope", norm_eps=1e-5,
                  tie_embeddings=True, norm="rmsnorm", activation="silu", gated_mlp=True,
                  qkv_bias=False, out_bias=False, mlp_bias=False),
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
        cfg = complete_config(cfg)
        if cfg.d_ff is None:
            cfg = cfg.replace(d_ff=default_d_ff(cfg.d_model))
        self.config = cfg
        self.model = LlamaBody(cfg)
        head = blocks.make_head(cfg)
        if head is not None:
            self.lm_head = head

    @property
    def layers(self) -> list:
        return self.model.layers

    @property
    def positional(self):
        return self.model.embed_positions

    def forward(self, tokens, ctx, cache):
        m = self.model
        h = m.dropout(ctx.positional.embed(m.embed_tokens(tokens), ctx.positions))
        for block, layer_cache in zip(m.layers, cache):
            h = block(h, ctx, layer_cache)
        return blocks.head_logits(m.norm(h), m.embed_tokens, self.get("lm_head"), self.config)

    # -- checkpoints and twins (see CausalLM) ----------------------------------------------

    hf_model_types = MODEL_TYPES
    config_from_hf = staticmethod(config_from_hf)
    hf_config = staticmethod(hf_config)

    @staticmethod
    def hf_layout(cfg: ModelConfig, file_names: Optional[list[str]] = None) -> CheckpointLayout:
        return LlamaLayout(cfg)

    @staticmethod
    def mlx_layout(cfg: ModelConfig) -> CheckpointLayout:
        return LlamaLayout(cfg)  # mlx-lm keeps HF's names and row order

    @staticmethod
    def mlx_lm_config(cfg: ModelConfig) -> dict[str, Any]:
        if cfg.positional != "rope":
            raise ValueError("mlx-lm's llama supports only rope positions")
        if cfg.sliding_window is not None:
            raise ValueError("mlx-lm's llama and qwen2 have no sliding window (mlx-lm reads Mistral "
                             "as a llama with full attention)")
        model_type = hf_model_type(cfg)  # the block checks: rmsnorm, gated, no head bias
        if cfg.activation != "silu":
            raise ValueError(f"mlx-lm's llama has a SiLU MLP only, this model uses {cfg.activation!r}")
        config = dict(model_type=model_type, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                      intermediate_size=cfg.d_ff, num_attention_heads=cfg.n_heads,
                      num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                      rms_norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size,
                      max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_base,
                      rope_traditional=cfg.rope_traditional, rope_scaling=rope_scaling_field(cfg),
                      tie_word_embeddings=cfg.tie_embeddings)
        if model_type == "llama":
            config.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        elif cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise ValueError("mlx-lm's qwen2 derives head_dim from hidden_size // num_attention_heads; "
                             f"this model has head_dim {cfg.head_dim} * {cfg.n_heads} heads != {cfg.d_model}")
        return config
