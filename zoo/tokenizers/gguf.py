"""The SentencePiece-BPE vocabulary embedded in a GGUF file (llama.cpp's "llama" tokenizer).

Encoding is SentencePiece's BPE by scores, as llama.cpp does it for SPM vocabularies: spaces
become "▁" and one "▁" is prefixed, the text is split into characters, and the adjacent pair
whose concatenation is the highest-scoring piece is merged until no pair is a piece (ties: the
leftmost pair). A character that is no piece falls back to its UTF-8 bytes (<0x00>..<0xFF>).

Unlike sentencepiece's default normaliser, nothing is collapsed or trimmed: " a" keeps its
leading space ("▁", "▁a") and "a  b" its double space. Where a SentencePiece model removes
extra whitespace (tok512.model does), the two agree on every text without leading, trailing
or repeated spaces.

Decoding joins the pieces ("▁" as a space, byte pieces as bytes, control tokens as nothing)
and drops the one space encoding prefixed, so every text round-trips (except a literal "▁",
which comes back as a space, as in SentencePiece).
"""

from __future__ import annotations

import heapq
import math
import re
from typing import Any, Optional

from .base import REPLACE_EACH_BYTE, Tokenizer

SPACE = "\u2581"  # "▁"
NO_TOKEN = 0xFFFFFFFF  # GGUF's "unset" id

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
WORD_TYPES = (NORMAL, USER_DEFINED, UNUSED)
UNKNOWN_SURFACE = " \u2047 "  # " ⁇ ", SentencePiece's default text for <unk>


class GGUFTokenizer(Tokenizer):
    """SentencePiece-style BPE over pieces with scores (llama.cpp's SPM vocabulary)."""

    utf8_errors = REPLACE_EACH_BYTE  # as sentencepiece decodes broken byte pieces
    leading_space = "drop_once"

    def __init__(
        self,
        pieces: list[str],
        scores: list[float],
        types: list[int],
        *,
        bos_id: Optional[int] = 1,
        eos_ids: tuple[int, ...] = (2,),
        unk_id: Optional[int] = 0,
        add_bos: bool = True,
        add_space_prefix: bool = True,
    ):
        n = len(pieces)
        if n == 0 or len(scores) != n or len(types) != n:
            raise ValueError(f"GGUF vocabulary needs as many scores and types as tokens: "
                             f"{n} tokens, {len(scores)} scores, {len(types)} types")
        for name, value in (("bos", bos_id), ("unk", unk_id), *(("eos", e) for e in eos_ids)):
            if value is not None and not 0 <= value < n:
                raise ValueError(f"{name} token id {value} is outside the vocabulary of {n} tokens")
        self.pieces, self.scores, self.types = list(pieces), [float(s) for s in scores], list(types)
        self.vocab_size = n
        self.bos_id, self.eos_ids, self.unk_id = bos_id, frozenset(eos_ids), unk_id
        self.add_bos = add_bos and bos_id is not None
        self.add_space_prefix = add_space_prefix
        # Pieces that merges may form, and the byte pieces for characters that are no piece.
        self._piece_id = {p: i for i, p in enumerate(pieces) if types[i] in (NORMAL, USER_DEFINED)}
        self._byte_id = {}
        for i, (p, t) in enumerate(zip(pieces, types)):
            if t == BYTE:
                self._byte_id[int(p[3:5], 16)] = i  # "<0x0A>"
        self.special_tokens = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t in (CONTROL, UNKNOWN)}
        self._bytes = [self._surface(i) for i in range(n)]

    def _surface(self, i: int) -> bytes:
        kind, piece = self.types[i], self.pieces[i]
        if kind == BYTE:
            return bytes([int(piece[3:5], 16)])
        if kind == CONTROL:
            return b""
        if kind == UNKNOWN:
            return UNKNOWN_SURFACE.encode("utf-8")
        return piece.replace(SPACE, " ").encode("utf-8")

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def _strippable(self, token: int) -> bool:
        return self.types[token] in WORD_TYPES

    def _ends_bytes(self, token: int) -> bool:
        return self.types[token] != BYTE

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        text = text.replace(" ", SPACE)
        if self.add_space_prefix:
            text = SPACE + text
        return [i for symbol in self._merge(text) for i in self._symbol_ids(symbol)]

    def _merge(self, text: str) -> list[str]:
        """Merge adjacent symbols into the highest-scoring pieces until none applies."""
        # A linked list of symbols over the characters: symbol k is text[start[k]:start[k]+size[k]].
        count = len(text)
        start, size = list(range(count)), [1] * count
        prev, nxt = list(range(-1, count - 1)), [*range(1, count), -1]
        queue: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged size)

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = text[start[left]:start[left] + size[left] + size[right]]
            i = self._piece_id.get(merged)
            if i is not None:
                heapq.heappush(queue, (-self.scores[i], left, right, len(merged)))

        for k in range(1, count):
            push(k - 1, k)
        while queue:
            _, left, right, merged_size = heapq.heappop(queue)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != merged_size:
                continue  # stale: one side was merged into something else since
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        symbols, k = [], 0
        while k != -1:
            symbols.append(text[start[k]:start[k] + size[k]])
            k = nxt[k]
        return symbols

    def _symbol_ids(self, symbol: str) -> list[int]:
        """A merged symbol's id; a lone character that is no piece as its UTF-8 bytes."""
        i = self._piece_id.get(symbol)
        if i is not None:
            return [i]
        # Merges only ever form pieces, so this is a single character outside the vocabulary.
        ids = [self._byte_id.get(b) for b in symbol.encode("utf-8")]
        if None in ids:
            if self.unk_id is None:
                raise ValueError(f"character {symbol!r} is not in the vocabulary, which has no "
                                 "byte pieces and no unknown token")
            return [self.unk_id]
        return ids


def _scalar(metadata: dict, key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if hasattr(value, "item"):
        value = value.item()
    return value


def _token_id(metadata: dict, key: str, default: Optional[int] = None) -> Optional[int]:
    """A special token id; absent -> `default` (llama.cpp's for SPM vocabularies), unset -> None."""
    value = _scalar(metadata, key, default)
    return None if value is None or int(value) in (NO_TOKEN, -1) else int(value)


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _check_vocabulary(pieces: list, scores: list, types: list, metadata: dict) -> None:
    """Finite scores (they order the merges) and well-formed byte pieces (the lengths and the
    special ids are checked by GGUFTokenizer)."""
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        if not isinstance(piece, str):
            raise ValueError(f"GGUF tokenizer.ggml.tokens[{i}] is {type(piece).__name__}, not a string")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"GGUF tokenizer.ggml.scores[{i}] (piece {piece!r}) is {score!r}; scores must be "
                             f"finite (they order the merges)")
        if int(kind) == BYTE and not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            raise ValueError(f"GGUF token {i} is a byte piece but reads {piece!r} (needs '<0xHH>')")


def tokenizer_from_gguf(metadata: dict) -> GGUFTokenizer:
    """The tokenizer described by a GGUF file's metadata (`mx.load(path, return_metadata=True)[1]`)."""
    model = _scalar(metadata, "tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in metadata:
        raise ValueError("GGUF metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if model != "llama":
        raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; kvzoo reads SentencePiece "
                         "vocabularies ('llama') from GGUF files")
    pieces = _as_list(metadata["tokenizer.ggml.tokens"])
    n = len(pieces)
    scores = _as_list(metadata["tokenizer.ggml.scores"]) if "tokenizer.ggml.scores" in metadata else [0.0] * n
    types = _as_list(metadata["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in metadata \
        else [NORMAL] * n
    eos = [_token_id(metadata, "tokenizer.ggml.eos_token_id", 2), _token_id(metadata, "tokenizer.ggml.eot_token_id")]
    _check_vocabulary(pieces, scores, types, metadata)
    tokenizer = GGUFTokenizer(
        pieces,
        scores,
        [int(t) for t in types],
        bos_id=_token_id(metadata, "tokenizer.ggml.bos_token_id", 1),
        eos_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        unk_id=_token_id(metadata, "tokenizer.ggml.unknown_token_id", 0),
        add_bos=bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", True)),
        add_space_prefix=bool(_scalar(metadata, "tokenizer.ggml.add_space_prefix", True)),
    )
    template = _scalar(metadata, "tokenizer.chat_template")  # llama.cpp keeps the HF template here
    tokenizer.chat_template = template if isinstance(template, str) else None
    roles = {"bos_token": tokenizer.bos_id, "eos_token": eos[0],
             "unk_token": _token_id(metadata, "tokenizer.ggml.unknown_token_id", 0),
             "pad_token": _token_id(metadata, "tokenizer.ggml.padding_token_id")}
    tokenizer.chat_special_tokens = {role: str(pieces[i]) for role, i in roles.items()
                                     if i is not None and 0 <= i < n}
    return tokenizer
