"""HF transformers checkpoints: config.json fields and tensor layouts of GPT-2 and Llama.

Our module names already follow HF's (gpt2: `transformer.h.N.attn.c_attn`, llama:
`model.layers.N.self_attn.q_proj`), so each layout is small: GPT-2 transposes its Conv1D
weights and may omit the `transformer.` prefix; both drop non-weight buffers and the tied
`lm_head`. Each family maps both ways, so `zoo.save` writes what `zoo.load_model` and
transformers' `from_pretrained` read.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from positional.rope import llama3_scaling

from .checkpoint import CheckpointLayout
from .config import ModelConfig
from .gguf import interleaved_to_halves


def _field(hf: dict[str, Any], key: str, model_type: str, *alternatives: str) -> Any:
    for k in (key, *alternatives):
        if hf.get(k) is not None:
            return hf[k]
    raise ValueError(f"config.json is missing {key!r}, which a {model_type} model needs")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# -- GPT-2 ---------------------------------------------------------------------------------

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation, nn.gelu_approx
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a GPT2LMHeadModel config.json."""
    activation = hf.get("activation_function", "gelu_new")
    _require(activation in GPT2_ACTIVATIONS,
             f"gpt2 activation_function {activation!r} is not supported (supported: {', '.join(GPT2_ACTIVATIONS)})")
    _require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
             "gpt2 attention must be scaled by 1/sqrt(head_dim) only: scale_attn_weights=false and "
             "scale_attn_by_inverse_layer_idx=true are not supported")
    d_model = int(_field(hf, "n_embd", "gpt2"))
    return ModelConfig(
        family="gpt2",
        vocab_size=int(_field(hf, "vocab_size", "gpt2")),
        d_model=d_model,
        n_layers=int(_field(hf, "n_layer", "gpt2")),
        n_heads=int(_field(hf, "n_head", "gpt2")),
        d_ff=int(hf.get("n_inner") or 4 * d_model),
        positional="learned",
        max_positions=int(_field(hf, "n_positions", "gpt2", "n_ctx")),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True,
        mlp_bias=True,
    )


def gpt2_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of a GPT2LMHeadModel equal to `cfg`, or ValueError."""
    _require(cfg.positional == "learned", f"HF gpt2 has learned positions only, this model uses {cfg.positional!r}")
    _require(cfg.n_kv_heads == cfg.n_heads, f"HF gpt2 has no grouped-query attention ({cfg.layout} here)")
    _require(cfg.head_dim * cfg.n_heads == cfg.d_model,
             f"HF gpt2 needs head_dim * n_heads == d_model, got {cfg.head_dim} * {cfg.n_heads} != {cfg.d_model}")
    _require(cfg.attention_bias and cfg.mlp_bias, "HF gpt2 always has attention and MLP biases")
    _require(cfg.rope_scale == 1.0, "rope_scale does not apply to gpt2")
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


# -- Llama ---------------------------------------------------------------------------------


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
        _require(isinstance(factor, (int, float)) and factor > 0,
                 f"linear rope scaling needs a positive 'factor', got {factor!r}")
        return theta, 1.0 / float(factor), None
    if kind == "llama3":
        return theta, 1.0, llama3_scaling(scaling)
    raise ValueError(f"llama rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json."""
    activation = hf.get("hidden_act", "silu")
    _require(activation == "silu", f"llama hidden_act {activation!r} is not supported (supported: silu)")
    n_heads = int(_field(hf, "num_attention_heads", "llama"))
    d_model = int(_field(hf, "hidden_size", "llama"))
    rope_base, rope_scale, rope_scaling = _rope_scale(hf)
    return ModelConfig(
        family="llama",
        vocab_size=int(_field(hf, "vocab_size", "llama")),
        d_model=d_model,
        n_layers=int(_field(hf, "num_hidden_layers", "llama")),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(_field(hf, "intermediate_size", "llama")),
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
        _require(cfg.rope_scale == 1.0, "HF llama cannot combine linear and llama3 rope scaling")
        return {"rope_type": "llama3", **cfg.rope_scaling}
    if cfg.rope_scale != 1.0:
        return {"type": "linear", "rope_type": "linear", "factor": 1.0 / cfg.rope_scale}
    return None


def llama_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields of a LlamaForCausalLM equal to `cfg`, or ValueError.

    RoPE is written in both spellings: `rope_theta`/`rope_scaling` (read by older transformers
    and mlx-lm) and `rope_parameters` (transformers >= 5).
    """
    _require(cfg.positional == "rope", f"HF llama has rope positions only, this model uses {cfg.positional!r}")
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


# -- the registry of model types -----------------------------------------------------------

HF_FAMILIES: dict[str, tuple[Callable[[dict], ModelConfig], Callable[[ModelConfig], dict]]] = {
    "gpt2": (gpt2_config, gpt2_hf_config),
    "llama": (llama_config, llama_hf_config),
}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict (model_type gpt2 or llama)."""
    model_type = hf.get("model_type")
    if model_type is None:
        raise ValueError(f"config.json is missing 'model_type' (supported: {', '.join(HF_FAMILIES)})")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; kvzoo loads: {', '.join(HF_FAMILIES)}")
    if hf.get("quantization_config"):
        raise ValueError("quantized checkpoints (config.json has quantization_config) are not supported")
    return HF_FAMILIES[model_type][0](hf)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for a model with config `cfg`, or ValueError if HF cannot express it."""
    if cfg.family not in HF_FAMILIES:
        raise ValueError(f"family {cfg.family!r} has no HF transformers equivalent (have: {', '.join(HF_FAMILIES)})")
    return HF_FAMILIES[cfg.family][1](cfg)


def layout(cfg: ModelConfig, file_names: Optional[list[str]] = None) -> CheckpointLayout:
    """The tensor layout of HF checkpoints of `cfg`'s family (file_names: what a file holds)."""
    if cfg.family == "gpt2":
        return GPT2Layout(cfg, prefixed=any(n.startswith("transformer.") for n in file_names or []))
    return LlamaLayout(cfg)
