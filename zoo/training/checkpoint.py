"""What a training run writes into its output folder, and reads back to resume.

    config.json + model.safetensors    zoo.save (HF names; transformers reads GPT-2/Llama ones);
                                       a model HF cannot express (ALiBi, GPT-2 with RoPE or
                                       GQA) gets config.json model_type "kvzoo" with its
                                       ModelConfig, same tensor names
    tokenizer files                    kvzoo_tokenizer.json (char/byte) or the loaded folder's files
    optimizer.npz                      AdamW moments and step count
    trainer_state.json                 settings, model config, step reached, loss history
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoints import hf
from ..checkpoints.layout import file_weights_of
from ..checkpoints.loading import CONFIG, WEIGHTS, save
from ..model import CausalLM
from ..tokenizers import Tokenizer
from ..tokenizers.simple import ByteTokenizer, CharTokenizer, save_simple

OPTIMIZER = "optimizer.npz"  # not .safetensors: loaders read every *.safetensors as weights
STATE = "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def save_model(model: CausalLM, folder: Path) -> None:
    """config.json + model.safetensors: HF's format where HF has this architecture, else
    kvzoo's native config.json (model_type "kvzoo") with the same tensor names."""
    try:
        hf.hf_config(model.config)
    except ValueError:
        pass
    else:
        save(model, folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": hf.NATIVE, "architectures": [], "kvzoo_config": model.config.to_dict()}
    weights = file_weights_of(model, hf.layout(model.config))
    mx.save_safetensors(str(folder / WEIGHTS), weights, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_tokenizer(tokenizer: Tokenizer, source: Any, folder: Path) -> None:
    """The tokenizer's files in `folder`: kvzoo_tokenizer.json for char/byte, else a copy of
    the tokenizer files of the folder (or file) it was loaded from."""
    if isinstance(tokenizer, (CharTokenizer, ByteTokenizer)):
        save_simple(tokenizer, folder)
        return
    source = Path(source)
    if source.is_file():  # a SentencePiece .model file given directly
        shutil.copyfile(source, folder / "tokenizer.model")
    else:
        names = [n for n in TOKENIZER_FILES if (source / n).exists()] + [p.name for p in source.glob("*.tiktoken")]
        for name in names:
            shutil.copyfile(source / name, folder / name)
    if tokenizer.add_bos:  # the text was encoded without BOS: prompts must be too
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        config_path.write_text(json.dumps({**config, "add_bos_token": False}, indent=2) + "\n")


def save_optimizer(optimizer: optim.Optimizer, folder: Path) -> None:
    """AdamW's state (moments, step, learning rate)."""
    arrays = dict(tree_flatten(optimizer.state))
    mx.savez(str(folder / OPTIMIZER), **arrays)


def load_optimizer(optimizer: optim.Optimizer, folder: Path) -> None:
    """Restore what save_optimizer wrote (into an optimizer initialised for the same model)."""
    path = folder / OPTIMIZER
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} is missing (it is written beside the model)")
    arrays = mx.load(str(path))
    expected = {name for name, _ in tree_flatten(optimizer.state)}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ValueError(f"{path} does not fit this model's optimizer: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    optimizer.state = tree_unflatten(list(arrays.items()))


def save_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE).write_text(json.dumps(state, indent=2) + "\n")


def load_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume from {folder}: no {STATE} (not a kvzoo train output folder)")
    return json.loads(path.read_text())
