"""Tokenizers built for training from scratch: one id per character, or one id per byte.

    tok = CharTokenizer.from_text(open("input.txt").read())   # the text's characters, sorted
    tok = ByteTokenizer()                                       # ids 0..255 are the bytes
    tok.save(folder); load_simple(folder)                       # kvzoo_tokenizer.json

Neither has BOS or EOS tokens. `zoo.load_tokenizer(folder)` reads them back by the file name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from .base import Tokenizer

FILE = "kvzoo_tokenizer.json"


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (ids in the alphabet's order)."""

    def __init__(self, chars: list[str]):
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("a character tokenizer needs a non-empty list of distinct single characters")
        self.chars = list(chars)
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The alphabet of `text`, sorted by code point."""
        if not text:
            raise ValueError("cannot build a character tokenizer from an empty text")
        return cls(sorted(set(text)))

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.ids[c] for c in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in this tokenizer's alphabet of "
                             f"{self.vocab_size} characters") from None

    def token_bytes(self, token: int) -> bytes:
        return self.chars[token].encode("utf-8")

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the UTF-8 bytes of the text; any text encodes."""

    vocab_size = 256

    def _encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def to_json(self) -> dict:
        return {"type": "byte"}


SimpleTokenizer = Union[CharTokenizer, ByteTokenizer]


def save_simple(tokenizer: SimpleTokenizer, folder: Union[str, Path]) -> Path:
    """Write `tokenizer` as folder/kvzoo_tokenizer.json; returns the file's path."""
    path = Path(folder) / FILE
    path.write_text(json.dumps(tokenizer.to_json(), ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_simple(folder: Union[str, Path]) -> SimpleTokenizer:
    """The character or byte tokenizer saved in `folder` (kvzoo_tokenizer.json)."""
    path = Path(folder) / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizer(data.get("chars") or [])
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"{path}: 'type' must be 'char' or 'byte', got {kind!r}")
