"""SentencePiece models (`tokenizer.model`) through the sentencepiece package."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import sentencepiece

from .base import REPLACE_EACH_BYTE, Tokenizer

SPACE = "\u2581"  # "▁", SentencePiece's visible space


class SentencePieceTokenizer(Tokenizer):
    """Encoding and decoding by sentencepiece itself; bytes per piece for streaming."""

    utf8_errors = REPLACE_EACH_BYTE  # as sentencepiece decodes broken byte pieces


    def __init__(self, model_file: Path, *, add_bos: bool = True, extra_eos_ids: Iterable[int] = ()):
        model_file = Path(model_file)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{model_file} is not a readable SentencePiece model: {error}") from error
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = {sp.eos_id()} if sp.eos_id() >= 0 else set()
        self.eos_ids = frozenset(eos | {int(i) for i in extra_eos_ids})
        self.add_bos = add_bos and self.bos_id is not None
        self.special_tokens = {
            sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)
        }
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self._word_piece = [not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
                            for i in range(self.vocab_size)]
        self.leading_space = self._probe_leading_space()

    def _probe_leading_space(self) -> str:
        """Ask sentencepiece how it decodes leading spaces (it depends on the normaliser)."""
        sp, words = self.sp, [i for i in range(self.vocab_size) if self._word_piece[i]]
        pieces = {i: sp.id_to_piece(i) for i in words}
        word = next((i for i, p in pieces.items() if p.startswith(SPACE) and p.strip(SPACE)), None)
        if word is None:
            return "keep"  # no piece carries a leading space
        if sp.decode([word]).startswith(" "):
            return "keep"
        blank = next((i for i, p in pieces.items() if p and not p.strip(SPACE)), None)
        if blank is not None and not sp.decode([blank, word]).startswith(" "):
            return "drop_while_empty"  # remove_extra_whitespaces: all leading blanks vanish
        return "drop_once"

    def _piece_bytes(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i):
            return b""
        if sp.is_byte(i):  # "<0xE6>"
            return bytes([int(sp.id_to_piece(i)[3:5], 16)])
        if sp.is_unknown(i):
            return sp.decode([i]).encode("utf-8")  # the model's unknown surface, " ⁇ " by default
        return sp.id_to_piece(i).replace(SPACE, " ").encode("utf-8")

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def _strippable(self, token: int) -> bool:
        return self._word_piece[token]

    def _ends_bytes(self, token: int) -> bool:
        return not self.sp.is_byte(token)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(self.check_ids(ids))


def load_sentencepiece(model_file: Path, *, add_bos: Optional[bool] = None,
                       extra_eos_ids: Iterable[int] = ()) -> SentencePieceTokenizer:
    """A SentencePiece tokenizer; BOS is added by default (the Llama convention)."""
    return SentencePieceTokenizer(model_file, add_bos=True if add_bos is None else add_bos,
                                  extra_eos_ids=extra_eos_ids)
