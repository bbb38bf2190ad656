"""The tokenizer interface every backend implements, and streaming detokenization.

    tok = zoo.load_tokenizer(folder)
    ids = tok.encode("Once upon a time")          # list[int]; BOS added if the model expects it
    tok.decode(ids)                                # "Once upon a time"
    detok = tok.detokenizer()
    for t in ids: print(detok.add_token(t), end="")   # text as soon as it is whole UTF-8
    print(detok.finalize())

A backend supplies `_encode_ordinary(text)` (plain text, no special tokens) and the bytes each
token contributes (`token_bytes`); the base class adds BOS handling, special tokens in text,
validation and the streaming detokenizer.
"""

from __future__ import annotations

import codecs
import operator
import re
from typing import Any, Iterable, Optional


class Tokenizer:
    """Text <-> token ids.

    bos_id: the beginning-of-sequence token, or None.
    eos_ids: tokens that end generation.
    vocab_size: ids are in [0, vocab_size).
    add_bos: whether `encode` prepends BOS by default (the model's training convention).
    special_tokens: text of special tokens -> id, recognised in text by
    `encode(..., allow_special=True)` only.
    leading_space: what decoding does with the space a word piece carries at the start of a
    text ("▁Once" -> "Once"): "keep" (byte-level BPE); "drop_once" (llama.cpp: one space, the
    one encoding prefixed, so text round-trips); "drop_while_empty" (sentencepiece: every
    leading word piece loses its space until some text has been produced).
    """

    bos_id: Optional[int] = None
    eos_ids: frozenset[int] = frozenset()
    vocab_size: int = 0
    add_bos: bool = False
    special_tokens: dict[str, int] = {}
    leading_space: str = "keep"
    chat_template: Optional[Any] = None  # jinja source, or {name: source} (tokenizers/chat.py)
    chat_special_tokens: dict[str, str] = {}  # bos_token, eos_token, ... as the template sees them
    utf8_errors: str = "replace"  # or REPLACE_EACH_BYTE (sentencepiece's policy)

    # -- what a backend implements ---------------------------------------------------------

    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of plain text, special-token text treated as ordinary characters."""
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes `token` adds to a decoded text (b"" for control tokens)."""
        raise NotImplementedError

    def _strippable(self, token: int) -> bool:
        """Whether the leading space of `token` is dropped at the start of a text."""
        return False

    def _ends_bytes(self, token: int) -> bool:
        """Whether `token` ends a run of byte pieces (an unfinished character becomes U+FFFD).

        Byte-level BPE joins all bytes before decoding; SentencePiece decodes each run of
        byte-fallback pieces on its own, so any other piece, even a control token, ends it.
        """
        return False

    # -- the interface ---------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: Optional[bool] = None, allow_special: bool = False) -> list[int]:
        """Token ids of `text`.

        add_bos: prepend the BOS token (default: the tokenizer's convention, `self.add_bos`).
        allow_special: recognise special tokens written in the text ("<|endoftext|>", "</s>");
        by default their text is encoded as ordinary characters.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        check_no_surrogates(text)
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token")
        ids = [self.bos_id] if add_bos else []
        if allow_special and self.special_tokens:
            return ids + self._encode_special(text)
        return ids + self._encode_ordinary(text)

    def _encode_special(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings in it mapped to their ids."""
        ids: list[int] = []
        for piece in _split_special(text, self.special_tokens):
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (invalid UTF-8 from partial byte tokens becomes U+FFFD)."""
        detok = self.detokenizer()
        for token in self.check_ids(ids):  # all checked before any is decoded
            detok.add_token(token)
        detok.finalize()
        return detok.text

    def detokenizer(self, *, continuation: bool = False) -> "StreamingDetokenizer":
        """A streaming decoder for tokens produced one at a time.

        continuation=True: the tokens continue a text (a generated reply to a prompt), so a
        leading space is kept even where `decode` would drop it at the start of a text.
        """
        return StreamingDetokenizer(self, continuation=continuation)

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as a list of ints, or ValueError naming the first id outside the vocabulary."""
        if hasattr(ids, "tolist"):  # mx.array / numpy
            ids = ids.tolist()
        return [self.check_id(i) for i in ids]

    def check_id(self, token: Any) -> int:
        """`token` as an int, or TypeError / ValueError if it is no id of this vocabulary."""
        if isinstance(token, bool) or not hasattr(token, "__index__"):
            raise TypeError(f"token ids must be ints, got {token!r}")
        token = operator.index(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary: ids must be in [0, {self.vocab_size})")
        return token

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={sorted(self.eos_ids)})")


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_no_surrogates(text: str) -> None:
    """Refuse a lone surrogate (U+D800..U+DFFF): it is no character and has no UTF-8, so every
    tokenizer would have to guess (GPT-2's turned it into U+FFFD, sentencepiece raised).
    One behaviour for all: a ValueError naming the character position."""
    found = _SURROGATE.search(text)
    if found is not None:
        i = found.start()
        raise ValueError(
            f"text has a lone surrogate U+{ord(text[i]):04X} at character {i} (of {len(text)}): it is not "
            f"a Unicode character and has no UTF-8 encoding. Text read with errors='surrogateescape' "
            f"or a broken UTF-16 pair makes these; decode the bytes properly, or replace them "
            f"(text.encode('utf-8', 'replace').decode())")


def _split_special(text: str, specials: dict[str, int]) -> list[str]:
    """`text` split around occurrences of special-token strings (longest match first)."""
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    return re.split(f"({pattern})", text)


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    """One U+FFFD per invalid byte, as sentencepiece decodes byte pieces (Python's "replace"
    gives one per maximal invalid subsequence, as HF tokenizers do)."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd" * (error.end - error.start), error.end


REPLACE_EACH_BYTE = "kvzoo.replace_each_byte"
codecs.register_error(REPLACE_EACH_BYTE, _replace_each_byte)


class StreamingDetokenizer:
    """Decode tokens one at a time; text is released only once its UTF-8 is complete.

    A multi-byte character split over several tokens (byte-fallback pieces, GPT-2's byte-level
    tokens for emoji and CJK) is held back until its last byte arrives, so every piece returned
    is valid text and the pieces concatenate to the full decode.
    """

    def __init__(self, tokenizer: Tokenizer, *, continuation: bool = False):
        self.tokenizer = tokenizer
        self.continuation = continuation
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self.tokens: list[int] = []
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=self.tokenizer.utf8_errors)
        self._at_start = not self.continuation  # no bytes produced yet

    def add_token(self, token: int) -> str:
        """Consume one token id; return the text it completes (possibly "")."""
        tok = self.tokenizer
        token = tok.check_id(token)
        self.tokens.append(token)
        data = tok.token_bytes(token)
        flushed = self._decoder.decode(b"", final=True) if tok._ends_bytes(token) else ""
        if self._at_start and data:
            if tok.leading_space != "keep" and tok._strippable(token) and data[:1] == b" ":
                data = data[1:]
                self._at_start = tok.leading_space == "drop_while_empty" and not data
            else:
                self._at_start = False
        piece = flushed + self._decoder.decode(data)
        self.text += piece
        return piece

    def finalize(self) -> str:
        """Flush bytes held back (an unfinished character becomes U+FFFD); return that text."""
        piece = self._decoder.decode(b"", final=True)
        self.text += piece
        return piece
