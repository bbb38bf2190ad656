"""Model configuration: one dataclass for every family, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import positional
from positional.rope import llama3_scaling


NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")  # gelu: exact (erf); gelu_tanh: GPT-2's
BLOCK_FLAGS = ("gated_mlp", "qkv_bias", "out_bias", "mlp_bias")
BLOCK_CHOICES = ("norm", "activation") + BLOCK_FLAGS  # None in a config: the family's choice


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only transformer.

    `n_kv_heads` < `n_heads` gives grouped-query attention (1 gives multi-query).
    `head_dim` defaults to d_model // n_heads. `max_positions` bounds learned positions only.
    `rope_scale` multiplies positions (linear scaling: 1 / factor). `rope_scaling` is Llama 3's
    per-frequency scaling: {factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings} (positional.rope.llama3_scaling), or None.

    The block's parts (None: the family's own choice, filled in when the model is built):
    `norm` ("layernorm", "rmsnorm"); `activation` of the MLP ("gelu" exact erf, "gelu_tanh",
    "relu", "silu"); `gated_mlp` (act(gate(x)) * up(x), SwiGLU with silu, instead of
    act(up(x))); biases on the q/k/v projections (`qkv_bias`), the attention output
    projection (`out_bias`), the MLP (`mlp_bias`) and the LM head (`head_bias`).
    `sliding_window`: each query sees only the last `sliding_window` positions (itself
    included), as in Mistral; None for full causal attention.
    `dropout`: the probability of zeroing an activation after the embeddings, each attention
    output projection and each MLP (GPT-2's embd/resid dropout), in training mode only
    (`model.train()`); models are built in eval mode, where it does nothing.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    positional: str = "learned"
    max_positions: int = 1024
    rope_base: float = 10000.0
    rope_traditional: bool = False
    rope_scale: float = 1.0
    rope_scaling: Optional[dict[str, Any]] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    norm: Optional[str] = None
    activation: Optional[str] = None
    gated_mlp: Optional[bool] = None
    qkv_bias: Optional[bool] = None
    out_bias: Optional[bool] = None
    mlp_bias: Optional[bool] = None
    head_bias: bool = False
    sliding_window: Optional[int] = None
    init_std: float = 0.02
    dropout: float = 0.0

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_positions"):
            positive_int(name)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        positive_int("n_kv_heads")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                f"each key/value head serves n_heads // n_kv_heads query heads"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                    f"set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        positive_int("head_dim")
        if self.d_ff is not None:
            positive_int("d_ff")
        positional.get(self.positional)  # unknown scheme -> ValueError listing the registered ones
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            if self.positional != "rope":
                raise ValueError(f"rope_scaling (llama3) needs positional='rope', got {self.positional!r}")
            object.__setattr__(self, "rope_scaling", llama3_scaling(self.rope_scaling))
        for name in ("norm_eps", "init_std", "rope_base", "rope_scale"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in BLOCK_FLAGS + ("tie_embeddings", "head_bias"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if self.sliding_window is not None:
            positive_int("sliding_window")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def layout(self) -> str:
        """'MHA', 'GQA' or 'MQA'."""
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"

    @property
    def block_resolved(self) -> bool:
        """True once every block choice (norm, activation, MLP gating, biases) is set."""
        return all(getattr(self, name) is not None for name in BLOCK_CHOICES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (and validated)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown config field(s) {unknown}; fields: {field_names()}")
        return replace(self, **changes)


def field_names() -> str:
    return ", ".join(f.name for f in fields(ModelConfig))
