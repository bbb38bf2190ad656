"""SentencePiece-style tokenizer.json (Llama 2, Mistral, TinyLlama) through the `tokenizers` library.

HF's fast tokenizers for SentencePiece models store a BPE (or Unigram) vocabulary whose
pieces carry "▁" for a space, with byte fallback (`<0x0A>` pieces for bytes the vocabulary
lacks), a normalizer or Metaspace pre-tokenizer that turns spaces into "▁" (and prefixes one),
and a decoder that undoes it: Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)]
or Metaspace. Encoding and decoding are the `tokenizers` library's own (what transformers
runs); kvzoo adds only what streaming needs, the bytes of each piece:

- a word piece gives its text with "▁" as a space; the text loses the one leading space the
  Strip decoder removes ("drop_once");
- a byte piece gives its byte; a run of byte pieces is decoded as a whole, as the ByteFallback
  decoder does (valid UTF-8, or one U+FFFD per byte of the run), so the streaming detokenizer
  releases a run's text when the run ends (at the next other piece, or at `finalize`);
- special added tokens (`<s>`, `</s>`, `<unk>`) give nothing (decoded with skip_special_tokens),
  other added tokens their text. A special token does not end a byte run (it is skipped
  before the decoder runs).

Decoders kvzoo cannot stream byte for byte are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

from .base import StreamingDetokenizer, Tokenizer

SPACE = "\u2581"  # "▁"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def is_sentencepiece_style(data: dict[str, Any]) -> bool:
    """Whether a tokenizer.json dict holds a SentencePiece-style vocabulary (this module's)
    rather than a byte-level BPE (bpe.py): its decoder turns "▁" back into spaces."""
    decoder = data.get("decoder") or {}
    steps = decoder.get("decoders") or [] if decoder.get("type") == "Sequence" else [decoder]
    return any(step.get("type") == "ByteFallback"
               or (step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == SPACE)
               for step in steps)


def _check_decoder(decoder: dict[str, Any], path: Path) -> str:
    """What the decoder does with the first space of a text: "drop_once" (Llama 2's
    Sequence[Replace('▁', ' '), ByteFallback, Fuse, Strip(' ', 1, 0)]) or "keep" (the same
    without Strip); ValueError naming any other decoder."""
    kind = decoder.get("type")
    steps = [step.get("type") for step in decoder.get("decoders") or []] if kind == "Sequence" else [kind]
    if steps not in (["Replace", "ByteFallback", "Fuse", "Strip"], ["Replace", "ByteFallback", "Fuse"]):
        raise ValueError(f"{path}: decoder {steps} is not one kvzoo streams exactly (supported: "
                         f"Sequence[Replace('▁', ' '), ByteFallback, Fuse] with or without Strip(' ', 1, 0))")
    replace = decoder["decoders"][0]
    if (replace.get("pattern") or {}).get("String") != SPACE or replace.get("content") != " ":
        raise ValueError(f"{path}: decoder Replace {replace.get('pattern')} -> {replace.get('content')!r} "
                         f"(need '▁' -> ' ')")
    if len(steps) == 4:
        strip = decoder["decoders"][3]
        if (strip.get("content"), strip.get("start"), strip.get("stop")) != (" ", 1, 0):
            raise ValueError(f"{path}: decoder Strip {strip} (need content ' ', start 1, stop 0)")
        return "drop_once"
    return "keep"


class ByteRunDetokenizer(StreamingDetokenizer):
    """Streaming as the ByteFallback decoder decodes: a run of byte pieces is one unit, valid
    UTF-8 as a whole or one U+FFFD per byte, so its text is released when the run ends (at the
    next other token, or `finalize`)."""

    def reset(self) -> None:
        super().reset()
        self._run = bytearray()

    def add_token(self, token: int) -> str:
        tok = self.tokenizer
        token = tok.check_id(token)
        self.tokens.append(token)
        if tok._is_byte[token]:
            self._run += tok.token_bytes(token)
            return ""
        if token in tok._skipped:  # special tokens vanish before decoding: a byte run goes on across them
            return ""
        return self._emit(self._flush_run() + tok.token_bytes(token).decode("utf-8"))

    def finalize(self) -> str:
        return self._emit(self._flush_run())

    def _flush_run(self) -> str:
        run, self._run = bytes(self._run), bytearray()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            if self.tokenizer.leading_space == "drop_once" and text[0] == " ":
                text = text[1:]  # the Strip decoder: the first space of the whole text
            self._at_start = False
        self.text += text
        return text


class HFJsonTokenizer(Tokenizer):
    """A SentencePiece-style tokenizer.json, encoded and decoded by the `tokenizers` library."""

    def __init__(self, path: Path, *, bos_token: Optional[str] = None, eos_tokens: Iterable[str] = (),
                 add_bos: bool = False, extra_eos_ids: Iterable[int] = ()):
        import json

        from tokenizers import Tokenizer as Library

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.library = Library.from_str(json.dumps(data))
        except Exception as error:  # json errors, or the library's own parse error
            raise ValueError(f"{path} is not a readable tokenizer.json: {error}") from None
        self.leading_space = _check_decoder(data.get("decoder") or {}, path)
        lib = self.library
        self.vocab_size = lib.get_vocab_size(with_added_tokens=True)
        added = lib.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens = {token.content: i for i, token in added.items() if token.special}
        specials = set(self.special_tokens.values())
        self._skipped = frozenset(specials)
        byte_fallback = bool((data.get("model") or {}).get("byte_fallback"))
        self._bytes: list[bytes] = []
        self._is_byte: list[bool] = []
        for i in range(self.vocab_size):
            piece = lib.id_to_token(i)
            match = BYTE_PIECE.fullmatch(piece or "") if byte_fallback and i not in added else None
            self._is_byte.append(match is not None)
            if piece is None or i in specials:
                self._bytes.append(b"")
            elif match:
                self._bytes.append(bytes([int(match.group(1), 16)]))
            elif i in added:
                self._bytes.append(piece.encode("utf-8"))
            else:
                self._bytes.append(piece.replace(SPACE, " ").encode("utf-8"))
        for token in [bos_token, *eos_tokens]:
            if token is not None and lib.token_to_id(token) is None:
                raise ValueError(f"{path}: {token!r} is named as BOS/EOS but is not in the vocabulary")
        self.bos_id = lib.token_to_id(bos_token) if bos_token is not None else None
        self.eos_ids = frozenset({lib.token_to_id(t) for t in eos_tokens} | {int(i) for i in extra_eos_ids if 0 <= int(i) < self.vocab_size})
        self.add_bos = add_bos and self.bos_id is not None

    def _run(self, text: str, special: bool) -> list[int]:
        self.library.encode_special_tokens = not special  # True: special-token text is plain text
        return self.library.encode(text, add_special_tokens=False).ids

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._run(text, special=False)

    def _encode_special(self, text: str) -> list[int]:
        return self._run(text, special=True)  # the library splits special tokens out, as transformers does

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def detokenizer(self, *, continuation: bool = False) -> ByteRunDetokenizer:
        return ByteRunDetokenizer(self, continuation=continuation)

    def decode(self, ids: Iterable[int]) -> str:
        return self.library.decode(self.check_ids(ids), skip_special_tokens=True)


def load_hf_json(folder: Path, config: dict[str, Any], roles: dict[str, str],
                 extra_eos_ids: Iterable[int] = ()) -> HFJsonTokenizer:
    """The tokenizer.json in `folder`. BOS: tokenizer_config.json's `add_bos_token` with its
    `bos_token`; without `add_bos_token`, the token the post-processor puts first (Llama's
    `<s> $A` template), as transformers encodes with add_special_tokens=True."""
    from .bpe import _template_bos, read_json

    bos, add_bos = roles.get("bos_token"), config.get("add_bos_token")
    if add_bos is None:
        template_bos = _template_bos(read_json(folder / "tokenizer.json").get("post_processor"))
        bos, add_bos = (template_bos, True) if template_bos is not None else (bos, False)
    return HFJsonTokenizer(folder / "tokenizer.json", bos_token=bos,
                           eos_tokens=[roles["eos_token"]] if "eos_token" in roles else [],
                           add_bos=bool(add_bos), extra_eos_ids=extra_eos_ids)
