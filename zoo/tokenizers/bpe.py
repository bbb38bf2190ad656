"""Byte-level BPE through tiktoken: GPT-2's from HF's vocab.json + merges.txt or a .tiktoken
file, and GPT-2, Llama 3 or Qwen2-style ones from an HF tokenizer.json."""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import tiktoken

from .base import Tokenizer

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py; tiktoken's r50k pattern): contractions,
# letters, digits and punctuation runs each with one optional leading space, then whitespace.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable character standing for each byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes map in order to
    U+0100 upwards, so every byte string is a printable string (as in vocab.json).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def ranks_from_vocab_and_merges(vocab: dict[str, int], merges: list, source: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks, other vocabulary entries) from a byte-level BPE vocabulary and merges.

    tiktoken merges the adjacent pair whose result has the lowest rank and uses the rank as
    the token id, so this needs the vocabulary's ids to follow the merge order (true of GPT-2:
    256 bytes, then one token per merge line). Entries that are not bytes or merge results
    (such as "<|endoftext|>") are returned separately, with their ids.
    """
    to_byte = gpt2_unicode_to_byte()
    check_vocab(vocab, source)

    def as_bytes(token: str) -> bytes:
        try:
            return bytes(to_byte[ch] for ch in token)
        except KeyError as error:
            raise ValueError(f"{source}: token {token!r} is not in GPT-2's byte-level alphabet") from error

    ranks: dict[bytes, int] = {}
    for ch, b in to_byte.items():
        if ch not in vocab:
            raise ValueError(f"{source} lacks the single-byte token {ch!r} (byte {b})")
        ranks[bytes([b])] = vocab[ch]
    merge_ids = []
    for n, pair in enumerate(merges):
        pair = pair.split() if isinstance(pair, str) else list(pair)
        if len(pair) != 2:
            raise ValueError(f"{source}: merge {n + 1} should be two tokens, got {pair}")
        for part in pair:
            if as_bytes(part) not in ranks:
                raise ValueError(f"{source}: merge {n + 1} {pair} uses {part!r}, which is neither a byte "
                                 f"nor made by an earlier merge")
        merged = pair[0] + pair[1]
        if merged not in vocab:
            raise ValueError(f"{source}: merge {n + 1} {pair} makes {merged!r}, which is not in the vocabulary")
        ranks[as_bytes(merged)] = vocab[merged]
        merge_ids.append(vocab[merged])
    if max(ranks[bytes([b])] for b in range(256)) >= min(merge_ids, default=256) or any(
        x >= y for x, y in zip(merge_ids, merge_ids[1:])
    ):
        raise ValueError(f"{source}: token ids do not follow the merge order; "
                         "tiktoken needs ids = merge priority (as in GPT-2's files)")
    rank_ids = set(ranks.values())
    others = {token: i for token, i in vocab.items() if i not in rank_ids}
    return ranks, others


def check_vocab(vocab: object, source: str) -> None:
    """A vocabulary is a map of token text to distinct ids >= 0."""
    if not isinstance(vocab, dict):
        raise ValueError(f"{source}: the vocabulary must be a JSON object token -> id, got {type(vocab).__name__}")
    seen: dict[int, str] = {}
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{source}: token {token!r} has id {i!r}; ids must be ints >= 0")
        if i in seen:
            raise ValueError(f"{source}: tokens {seen[i]!r} and {token!r} share id {i}")
        seen[i] = token


# Vocabulary entries outside the merges that are control tokens by their look ("<|endoftext|>",
# "<pad>", "</s>", "[PAD]"); any other unreachable entry means the files do not fit together.
CONTROL_LIKE = re.compile(r"<\|[^\s]+\|>|<[^\s<>]+>|\[[A-Z_]+\]")


def check_reachable(others: dict[str, int], declared: set[str], source: str) -> None:
    """Every vocabulary entry that is not a byte or a merge result must be a special token
    (declared in the files, or written like one); otherwise merges.txt is cut short or belongs
    to another vocabulary, and encoding would silently differ."""
    stray = sorted((i, t) for t, i in others.items() if t not in declared and not CONTROL_LIKE.fullmatch(t))
    if stray:
        shown = ", ".join(f"{t!r} (id {i})" for i, t in stray[:5])
        raise ValueError(
            f"{source}: {len(stray)} vocabulary entr{'y is' if len(stray) == 1 else 'ies are'} neither a "
            f"byte, a merge result nor a special token: {shown}{', ...' if len(stray) > 5 else ''}. No "
            f"merge can produce them, so the merges are cut short or belong to another vocabulary")


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None


def ranks_from_hf_files(vocab_path: Path, merges_path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Ranks and other entries from HF's vocab.json and merges.txt (a "#version" header line,
    then one "a b" merge per line)."""
    try:
        vocab = json.loads(_read_text(vocab_path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{vocab_path} is not valid JSON: {error}") from None
    lines = _read_text(merges_path).split("\n")
    merges = [line for line in lines if line and not line.startswith("#version")]
    return ranks_from_vocab_and_merges(vocab, merges, f"{vocab_path} + {merges_path}")


@dataclass
class TokenizerJson:
    """What kvzoo takes from an HF tokenizer.json holding a byte-level BPE."""

    ranks: dict[bytes, int]  # token bytes -> id (= merge priority)
    others: dict[str, int]  # added tokens and vocabulary entries outside the merges -> id
    pattern: str  # the pre-tokenizer's split regex
    nfc: bool  # a Unicode NFC normalizer runs first (Qwen2-style)
    bos_token: Optional[str]  # the special token the post-processor puts first (Llama 3-style)
    added: set = field(default_factory=set)  # the added_tokens' contents (special by declaration)


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
            and bool(step.get("use_regex", True)) == use_regex)


def _split_pattern(pre: dict) -> Optional[str]:
    """The split regex of a byte-level pre-tokenizer kvzoo reproduces exactly, or None.

    GPT-2: ByteLevel with its built-in regex. Llama 3, Qwen2 and other tiktoken-style
    tokenizers: Sequence[Split(Regex, Isolated), ByteLevel without regex].
    """
    if _byte_level(pre, use_regex=True):
        return GPT2_SPLIT_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    regex = (split.get("pattern") or {}).get("Regex") if split.get("type") == "Split" else None
    if regex and split.get("behavior") == "Isolated" and not split.get("invert") and _byte_level(byte_level, False):
        return regex
    return None


def _template_bos(post: Optional[dict]) -> Optional[str]:
    """The special token a TemplateProcessing post-processor puts before a single sequence."""
    if not post:
        return None
    processors = (post.get("processors") or []) if post.get("type") == "Sequence" else [post]
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            single = processor.get("single") or []
            first = single[0] if single else {}
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None


def read_tokenizer_json(path: Path) -> TokenizerJson:
    """A byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen2 style) as tiktoken needs it.

    Anything kvzoo would not reproduce exactly (another model type or pre-tokenizer, byte
    fallback, a normalizer other than NFC, a decoder other than ByteLevel) is a ValueError
    naming it, rather than a silently different tokenizer.
    """
    data = read_json(path)
    for key in ("model", "pre_tokenizer", "normalizer", "decoder", "post_processor"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key!r} must be a JSON object, got {type(data[key]).__name__}")
    if not isinstance(data.get("added_tokens") or [], list):
        raise ValueError(f"{path}: 'added_tokens' must be a list")
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    normalizer = data.get("normalizer")
    pattern = _split_pattern(pre)
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (need 'BPE')")
    if pattern is None:
        problems.append(f"pre_tokenizer {pre.get('type')!r} (need ByteLevel with GPT-2's regex, or "
                        "Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)])")
    if normalizer is not None and normalizer.get("type") != "NFC":
        problems.append(f"normalizer {normalizer.get('type')!r} (only NFC or none)")
    if (data.get("decoder") or {}).get("type", "ByteLevel") != "ByteLevel":
        problems.append(f"decoder {data['decoder'].get('type')!r} (need ByteLevel)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("byte_fallback / subword prefixes")
    if problems:
        raise ValueError(f"{path} is not a byte-level BPE kvzoo reproduces exactly: it has {', '.join(problems)}")
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise ValueError(f"{path}: model.merges must be a list, got {type(merges).__name__}")
    ranks, others = ranks_from_vocab_and_merges(model.get("vocab") or {}, merges, str(path))
    added = set()
    for entry in data.get("added_tokens") or []:
        content, i = (entry.get("content"), entry.get("id")) if isinstance(entry, dict) else (None, None)
        if not isinstance(content, str) or not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{path}: added token {str(entry)[:80]} needs a str 'content' and an int 'id' >= 0")
        others[content] = i
        added.add(content)
    return TokenizerJson(ranks, others, pattern, nfc=normalizer is not None,
                         bos_token=_template_bos(data.get("post_processor")), added=added)


def ranks_from_tiktoken_file(path: Path) -> dict[bytes, int]:
    """Mergeable ranks from a .tiktoken file: one `base64(token bytes) rank` line per token."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines()):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as error:
            raise ValueError(f"{path}: line {n + 1} is not `base64 rank`: {line[:60]!r}") from error
    return ranks


class BPETokenizer(Tokenizer):
    """Byte-level BPE encoded and decoded by tiktoken; `pattern` is the pre-tokenizer's split
    regex (GPT-2's by default)."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: Optional[dict[str, int]] = None,
        *,
        bos_token: Optional[str] = None,
        eos_tokens: Iterable[str] = (),
        add_bos: bool = False,
        pattern: str = GPT2_SPLIT_PATTERN,
        nfc: bool = False,
        name: str = "gpt2",
    ):
        special_tokens = dict(special_tokens or {})
        clash = sorted(set(special_tokens.values()) & set(ranks.values()))
        if clash:
            raise ValueError(f"special token ids {clash[:5]} collide with ordinary token ids")
        for token in [bos_token, *eos_tokens]:
            if token is not None and token not in special_tokens:
                raise ValueError(f"{token!r} is named as BOS/EOS but is not a special token "
                                 f"(special tokens: {sorted(special_tokens)})")
        self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=special_tokens)
        self.special_tokens = special_tokens
        self.vocab_size = self.encoding.n_vocab
        self.bos_id = special_tokens[bos_token] if bos_token is not None else None
        self.eos_ids = frozenset(special_tokens[t] for t in eos_tokens)
        self.add_bos = add_bos
        self.nfc = nfc  # normalise text to Unicode NFC before splitting (the tokenizer's normalizer)
        self._valid = frozenset(ranks.values()) | frozenset(special_tokens.values())

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(self._normalize(text))

    def _encode_special(self, text: str) -> list[int]:
        return self.encoding.encode(self._normalize(text), allowed_special="all", disallowed_special=())

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def token_bytes(self, token: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(self.check_ids(ids), errors="replace")

    def check_id(self, token) -> int:
        token = super().check_id(token)
        if token not in self._valid:  # a hole in the id range
            raise ValueError(f"token id {token} has no bytes in this vocabulary")
        return token


def special_tokens_from_hf(folder: Path, others: dict[str, int], first_free_id: int) -> tuple[dict[str, int], dict]:
    """Special tokens named by an HF folder's special_tokens_map.json / tokenizer_config.json.

    Ids come from `added_tokens_decoder`, then `others` (vocab.json entries outside the merges),
    then the next free ids after the ordinary tokens. Returns (text -> id, the roles
    {"bos_token": ..., "eos_token": ...}).
    """
    config = read_json(folder / "tokenizer_config.json")
    special_map = read_json(folder / "special_tokens_map.json")
    roles = {}
    for source in (config, special_map):
        for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = source.get(role)
            if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
                value = value.get("content")
            if isinstance(value, str):
                roles[role] = value
    ids = dict(others)
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and "content" in entry:
            ids[entry["content"]] = int(key)
    extra = [t for t in special_map.get("additional_special_tokens", []) if isinstance(t, str)]
    extra += [t for t in config.get("additional_special_tokens", []) or [] if isinstance(t, str)]
    specials = {}
    next_id = max([first_free_id, *(i + 1 for i in ids.values())])  # new ids after every id taken
    for token in [*dict.fromkeys([*roles.values(), *extra, *others])]:
        if token not in ids:
            ids[token] = next_id
            next_id += 1
        specials[token] = ids[token]
    roles["declared"] = [*roles.values(), *extra, *(e["content"] for e in (config.get("added_tokens_decoder") or {}).values()
                                                    if isinstance(e, dict) and "content" in e)]
    return specials, roles


def read_json(path: Path) -> dict:
    """A JSON object from `path` ({} if the file is absent; ValueError if it is not JSON)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_bpe(folder: Path, tiktoken_file: Optional[Path] = None) -> BPETokenizer:
    """A byte-level BPE tokenizer from an HF folder (vocab.json + merges.txt, else
    tokenizer.json) or a .tiktoken file."""
    folder = Path(folder)
    pattern, nfc, template_bos, added = GPT2_SPLIT_PATTERN, False, None, set()
    if tiktoken_file is None and (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        ranks, others = ranks_from_hf_files(folder / "vocab.json", folder / "merges.txt")
        source = f"{folder / 'vocab.json'} + merges.txt"
    elif tiktoken_file is None:
        parsed = read_tokenizer_json(folder / "tokenizer.json")
        ranks, others, pattern, nfc, template_bos, added = (parsed.ranks, parsed.others, parsed.pattern,
                                                            parsed.nfc, parsed.bos_token, parsed.added)
        source = str(folder / "tokenizer.json")
    else:
        ranks, others = ranks_from_tiktoken_file(tiktoken_file), {}
        source = str(tiktoken_file)
        if not ranks:
            raise ValueError(f"{tiktoken_file} holds no tokens")
        vocab_path = folder / "vocab.json"
        if vocab_path.exists():  # ids of special tokens, if the HF vocabulary is beside it
            vocab = read_json(vocab_path)
            check_vocab(vocab, str(vocab_path))
            rank_ids = set(ranks.values())
            others = {t: i for t, i in vocab.items() if i not in rank_ids}
            source = f"{tiktoken_file} + {vocab_path.name}"
    taken = max([*ranks.values(), *others.values()])
    specials, roles = special_tokens_from_hf(folder, others, first_free_id=taken + 1)
    check_reachable(others, set(roles.pop("declared")) | added, source)
    config = read_json(folder / "tokenizer_config.json")
    eos = [roles["eos_token"]] if "eos_token" in roles else []
    # BOS: tokenizer_config's add_bos_token, else a post-processor that puts a token first
    # (Llama 3's tokenizer.json adds <|begin_of_text|> that way).
    bos, add_bos = roles.get("bos_token"), bool(config.get("add_bos_token", False))
    if template_bos is not None and "add_bos_token" not in config:
        bos, add_bos = template_bos, True
    return BPETokenizer(ranks, specials, bos_token=bos, eos_tokens=eos, add_bos=add_bos,
                        pattern=pattern, nfc=nfc)
