"""Small HF folders made with the real libraries, no downloads: random checkpoints written by
transformers' `save_pretrained`, and tokenizers trained by the `tokenizers` library.

mlx-lm's loader needs a tokenizer beside the weights; `save_tokenizer` gives it one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The quick brown fox jumps over the lazy dog. 1234567890!",
    "Hello, world! How are you today? I am fine, thank you.",
    "Ünïcödé, naïve café, 日本語のテキスト, emoji 🙂 and tabs\tand\nnew lines.",
    "def main():\n    return [x * 2 for x in range(10)]\n",
] * 4


def byte_level_tokenizer(vocab_size: int = 320, special_tokens: tuple[str, ...] = ("<|endoftext|>",)):
    """A GPT-2-style byte-level BPE trained on CORPUS (tokenizers' own trainer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_tokenizer(folder: Path, vocab_size: int = 320, special_tokens: tuple[str, ...] = ("<|endoftext|>",),
                   **init: Any) -> Any:
    """Write a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) into `folder`
    with transformers' PreTrainedTokenizerFast; returns that transformers tokenizer.
    `init`: PreTrainedTokenizerFast arguments (bos_token, eos_token, chat_template, ...)."""
    from transformers import PreTrainedTokenizerFast

    init = {"eos_token": special_tokens[0], "bos_token": special_tokens[0], **init}
    fast = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(vocab_size, special_tokens), **init)
    fast.save_pretrained(str(folder))
    return fast


def random_checkpoint(folder: Path, model_type: str, seed: int = 0, std: float = 0.15, **fields: Any) -> Any:
    """A random transformers model of `model_type` with config `fields`, saved with
    `save_pretrained` (fp32 safetensors) into `folder`, with a tokenizer beside it.

    Every weight and bias but the norms' is drawn from N(0, std), so logits spread over
    several units and a bias in the wrong place shows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name and ".ln_" not in name:
                parameter.normal_(0.0, std)
    model.save_pretrained(str(folder))
    save_tokenizer(folder)
    return model
