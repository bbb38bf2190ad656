"""The same weights in mlx-lm's own model classes, for parity tests and side-by-side benchmarks."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .hf import rope_scaling_field
from .model import CausalLM


def mlx_lm_args(model: CausalLM) -> dict[str, Any]:
    """The mlx-lm config (as a HF-style dict) equivalent to `model`'s, or ValueError."""
    cfg = model.config
    if cfg.family == "gpt2":
        if cfg.positional != "learned" or cfg.n_kv_heads != cfg.n_heads:
            raise ValueError("mlx-lm's gpt2 supports only learned positions and MHA")
        if cfg.head_dim * cfg.n_heads != cfg.d_model or cfg.d_ff != 4 * cfg.d_model:
            raise ValueError("mlx-lm's gpt2 needs head_dim * n_heads == d_model and d_ff == 4 * d_model")
        if not (cfg.tie_embeddings and cfg.attention_bias and cfg.mlp_bias):
            raise ValueError("mlx-lm's gpt2 needs tied embeddings and biases")
        return dict(model_type="gpt2", n_ctx=cfg.max_positions, n_embd=cfg.d_model,
                    n_head=cfg.n_heads, n_layer=cfg.n_layers, n_positions=cfg.max_positions,
                    layer_norm_epsilon=cfg.norm_eps, vocab_size=cfg.vocab_size)
    if cfg.family == "llama":
        if cfg.positional != "rope":
            raise ValueError("mlx-lm's llama supports only rope positions")
        scaling = rope_scaling_field(cfg)
        return dict(model_type="llama", hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                    intermediate_size=cfg.d_ff, num_attention_heads=cfg.n_heads,
                    num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                    rms_norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size,
                    max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_base,
                    rope_traditional=cfg.rope_traditional, rope_scaling=scaling,
                    tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
                    mlp_bias=cfg.mlp_bias)
    raise ValueError(f"no mlx-lm counterpart for family {cfg.family!r}")


def to_mlx_lm(model: CausalLM) -> Any:
    """An mlx-lm model holding the same weight arrays as `model` (no copy)."""
    from mlx_lm.utils import _get_classes

    args = mlx_lm_args(model)
    model_class, args_class = _get_classes(args)
    twin = model_class(args_class.from_dict(args))
    weights = dict(tree_flatten(model.parameters()))
    if model.config.family == "gpt2":
        # ours: transformer.{wte,wpe,h,ln_f}; mlx-lm: model.{wte,wpe,h,ln_f}
        weights = {"model." + k.removeprefix("transformer."): v for k, v in weights.items()}
    twin.update(tree_unflatten(list(weights.items())))
    missing = {k for k, _ in tree_flatten(twin.parameters())} - set(weights)
    if missing:
        raise ValueError(f"mlx-lm model has parameters kvzoo did not provide: {sorted(missing)[:5]}")
    mx.eval(twin.parameters())
    return twin
