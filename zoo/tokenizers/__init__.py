"""Tokenizers from the files beside a checkpoint, or from a GGUF file's metadata. No network.

    tok = load_tokenizer(Path("my-model"))   # tokenizer.model, vocab.json + merges.txt, or *.tiktoken
    tok = tokenizer_from_gguf(metadata)      # mx.load("m.gguf", return_metadata=True)[1]

Every tokenizer implements `Tokenizer` (tokenizer_base.py): encode, decode, bos_id, eos_ids,
vocab_size and a streaming detokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import StreamingDetokenizer, Tokenizer
from .chat import apply_chat_template, read_chat_template, special_token_strings
from .bpe import BPETokenizer, load_bpe, read_json
from .gguf import GGUFTokenizer, tokenizer_from_gguf
from .simple import ByteTokenizer, CharTokenizer, load_simple, save_simple
from .hf_json import HFJsonTokenizer, is_sentencepiece_style, load_hf_json
from .spm import SentencePieceTokenizer, load_sentencepiece

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "GGUFTokenizer",
    "HFJsonTokenizer",
    "SentencePieceTokenizer",
    "StreamingDetokenizer",
    "apply_chat_template",
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_from_gguf",
    "load_simple",
    "save_simple",
]

LOOKED_FOR = ("kvzoo_tokenizer.json (character or byte level), tokenizer.model (SentencePiece), "
              "tokenizer.json (SentencePiece-style or byte-level BPE), vocab.json + merges.txt (byte-level BPE), "
              "or a *.tiktoken file")


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer stored in `folder`, chosen by the files present.

    tokenizer.model -> SentencePiece; a SentencePiece-style tokenizer.json ("▁" pieces, byte
    fallback: Llama 2, Mistral, TinyLlama) -> the `tokenizers` library (hf_json.py);
    vocab.json + merges.txt, else tokenizer.json (byte-level BPE: GPT-2, Llama 3, Qwen2
    style) -> byte-level BPE; *.tiktoken -> byte-level BPE from
    tiktoken ranks; kvzoo_tokenizer.json -> the character or byte tokenizer `kvzoo train`
    built. Special tokens and BOS/EOS come from
    tokenizer_config.json / special_tokens_map.json; extra EOS ids from generation_config.json
    or config.json (`eos_token_id`).
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer needs a folder path (str or Path), got {type(folder).__name__} {folder!r}")
    folder = Path(folder)
    if folder.is_file():
        hint = (" (for a .gguf file: zoo.load(path) or tokenizer_from_gguf)" if folder.suffix == ".gguf"
                else "")
        raise ValueError(f"{folder} is a file; load_tokenizer takes the folder holding the tokenizer "
                         f"files ({LOOKED_FOR}), here {folder.parent}{hint}")
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if (folder / "kvzoo_tokenizer.json").exists():
        return load_simple(folder)
    config = read_json(folder / "tokenizer_config.json")
    tokenizer = _load_tokenizer(folder, config)
    tokenizer.chat_template = read_chat_template(folder, config)
    tokenizer.chat_special_tokens = special_token_strings(config, read_json(folder / "special_tokens_map.json"))
    return tokenizer


def _load_tokenizer(folder: Path, config: dict) -> Tokenizer:
    extra_eos = _eos_ids(folder)
    if (folder / "tokenizer.model").exists():
        add_bos = config.get("add_bos_token")
        return load_sentencepiece(folder / "tokenizer.model", add_bos=None if add_bos is None else bool(add_bos),
                                  extra_eos_ids=extra_eos)
    if (folder / "tokenizer.json").exists() and is_sentencepiece_style(read_json(folder / "tokenizer.json")):
        roles = special_token_strings(config, read_json(folder / "special_tokens_map.json"))
        return load_hf_json(folder, config, roles, extra_eos_ids=extra_eos)
    if ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()) or (folder / "tokenizer.json").exists():
        tokenizer = load_bpe(folder)
    else:
        tiktoken_files = sorted(folder.glob("*.tiktoken"))
        if len(tiktoken_files) > 1:
            raise ValueError(f"{folder} holds several .tiktoken files ({[p.name for p in tiktoken_files]}); "
                             "keep one")
        if not tiktoken_files:
            present = sorted(p.name for p in folder.iterdir())[:20]
            raise FileNotFoundError(f"no tokenizer found in {folder}: looked for {LOOKED_FOR}; "
                                    f"the folder holds {present}")
        tokenizer = load_bpe(folder, tiktoken_files[0])
    valid = [i for i in extra_eos if 0 <= i < tokenizer.vocab_size]
    tokenizer.eos_ids = frozenset(tokenizer.eos_ids | set(valid))
    return tokenizer


def _eos_ids(folder: Path) -> list[int]:
    """eos_token_id from generation_config.json / config.json (an int or a list)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = read_json(folder / name).get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool):
                ids.append(i)
    return ids

