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


def sentencepiece_style_tokenizer(style: str = "metaspace", vocab_size: int = 400):
    """A Llama 2 / Mistral / TinyLlama-style tokenizer.json built with the `tokenizers` library:
    a BPE over "▁" pieces trained on CORPUS, with byte fallback (<0x00>..<0xFF> in the
    vocabulary after <unk>, <s>, </s>, as in Llama 2's), a decoder Sequence[Replace('▁', ' '),
    ByteFallback, Fuse, Strip(' ', 1, 0)] and a `<s> $A` post-processor.

    style "metaspace": a Metaspace pre-tokenizer (prepend_scheme "first", as transformers writes
    Llama/Mistral tokenizers today); "legacy": Llama 2's original normalizer
    Sequence[Prepend('▁'), Replace(' ', '▁')] and no pre-tokenizer.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    space = "\u2581"
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer)
    trained = json.loads(trainer_tok.to_str())
    # Llama 2's id order: <unk> <s> </s>, the 256 byte pieces, then the learned pieces.
    learned = sorted(trained["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=False)
    else:
        raise ValueError(f"style must be 'metaspace' or 'legacy', got {style!r}")
    tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def save_sentencepiece_style(folder: Path, style: str = "metaspace") -> Any:
    """Write a SentencePiece-style tokenizer (see sentencepiece_style_tokenizer) with
    transformers' PreTrainedTokenizerFast, as Llama 2 folders hold it; returns transformers'
    tokenizer read back from the folder (AutoTokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=sentencepiece_style_tokenizer(style), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", add_bos_token=True, add_eos_token=False)
    fast.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))
