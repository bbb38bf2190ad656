"""kvzoo's model zoo: GPT-2 and Llama-style families composed from parts.

    import zoo, caches
    model = zoo.build("llama", preset="tiny", positional="alibi", n_kv_heads=1)
    cache = caches.make("preallocated", model)
    logits = model(tokens, cache)                     # [B, L, V]
    for token, logprobs in zoo.generate_step(model, prompt, cache="concat"): ...
    model, tokenizer = zoo.load("stories260K.gguf")      # or an HF folder
    text = zoo.generate(model, tokenizer, "Once upon a time", max_tokens=50, temp=0.8)
    result = zoo.batch_generate(model, tokenizer, ["Once upon a time", "A cat"], max_tokens=50)

Rooms: zoo/families (one file per family, with its checkpoint mappings), zoo/checkpoints
(load/save, HF, GGUF, mlx-lm twins), zoo/tokenizers, zoo/cli (one file per command),
zoo/runtime (device and dtype). The model top (model.py), config, registry, layers and the
generation loop (generate.py, stream.py) live at this level.
"""

# First, before anything imports mlx.core: load a fast BLAS for MLX's matmuls on Linux CPU
# (KVZOO_BLAS=off to keep MLX's own; see kvkvzoo/blas.py). Must stay above every other import.
from kvzoo import blas as _blas

_blas.setup()

from .config import ModelConfig  # noqa: E402
from .model import CausalLM  # noqa: E402
from .registry import available, build, from_config, make_config, presets, register_family  # noqa: E402

from . import families  # noqa: E402,F401  (register the built-in families)
from .checkpoints import load, load_model, save  # noqa: E402
from .distributed import shard  # noqa: E402
from .generate import generate_step  # noqa: E402
from .batch_stream import BatchResult, RowStats, batch_generate, batch_stream  # noqa: E402
from .stream import GenerationResponse, generate, stream_generate  # noqa: E402  zoo.generate: the function
from .tokenizers import Tokenizer, apply_chat_template, load_tokenizer, tokenizer_from_gguf  # noqa: E402
from . import study  # noqa: E402  zoo.study(...) runs a study; zoo.study.spec, .runner, ... are its parts
from .training import train  # noqa: E402
from .fingerprint import ModelMismatchError, adopt_cache  # noqa: E402
from .fingerprint import fingerprint as model_fingerprint  # noqa: E402  (zoo.fingerprint: the module)
from .ownership import CacheInUseError  # noqa: E402

__all__ = [
    "BatchResult",
    "RowStats",
    "batch_generate",
    "batch_stream",
    "CacheInUseError",
    "CausalLM",
    "ModelMismatchError",
    "adopt_cache",
    "model_fingerprint",
    "GenerationResponse",
    "ModelConfig",
    "apply_chat_template",
    "available",
    "build",
    "from_config",
    "generate",
    "generate_step",
    "load",
    "load_model",
    "load_tokenizer",
    "make_config",
    "presets",
    "register_family",
    "save",
    "shard",
    "stream_generate",
    "study",
    "tokenizer_from_gguf",
    "Tokenizer",
    "train",
]
