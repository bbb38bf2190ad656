"""The real tokenizers and their oracles, loaded once: stories260K's GGUF vocabulary beside
sentencepiece on tok512.model, and GPT-2's BPE beside transformers' GPT2TokenizerFast."""

from __future__ import annotations

from functools import lru_cache

from zoo.tokenizers import load_tokenizer, tokenizer_from_gguf
from zoo.tokenizers.bpe import BPETokenizer
from zoo.tokenizers.gguf import GGUFTokenizer

from .assets import require_asset, require_module


@lru_cache(maxsize=None)
def gguf_tokenizer() -> GGUFTokenizer:
    import mlx.core as mx

    _, metadata = mx.load(str(require_asset("stories260K/stories260K.gguf")), return_metadata=True)
    return tokenizer_from_gguf(metadata)


@lru_cache(maxsize=None)
def sentencepiece_oracle(remove_extra_whitespaces: bool = True):
    """sentencepiece on tok512.model, optionally with whitespace removal switched off."""
    import sentencepiece

    raw = require_asset("stories260K/tok512.model").read_bytes()
    if remove_extra_whitespaces:
        return sentencepiece.SentencePieceProcessor(model_proto=raw)
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(raw)
    assert proto.normalizer_spec.remove_extra_whitespaces  # what the data README says
    proto.normalizer_spec.remove_extra_whitespaces = False
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


VARIED = [
    "Hello world",
    "",
    " ",
    "   ",
    " leading space",
    "trailing space ",
    "two  spaces   three    four",
    "line one\nline two\n\nline four\n",
    "\ttabbed\t\tline",
    "mixed \t\n \r\n whitespace",
    "don't can't I'll we've they're she'd it's I'm",
    "DON'T Shouldn't",
    "1234567890 3.14159 -42 1,000,000 2024-01-01",
    "café naïve résumé Ångström façade",
    "Ünïcödé ß ø æ œ",
    "emoji 🙂😀🎉 and 👨‍👩‍👧‍👦 family",
    "日本語のテキスト、中文文本，한국어",
    "Привет, мир! Γειά σου Κόσμε",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "<|endoftext|> spaced <|endoftext|>",
    "code: def f(x):\n    return x**2  # square",
    "URL https://example.com/a?b=c&d=e#f",
    "\u00a0non-breaking\u00a0space and\u3000ideographic space",
    "zero\u200bwidth joiner\u200d",
]


@lru_cache(maxsize=None)
def kvzoo_gpt2() -> BPETokenizer:
    return load_tokenizer(require_asset("gpt2-tokenizer"))


@lru_cache(maxsize=None)
def hf_gpt2():
    transformers = require_module("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(require_asset("gpt2-tokenizer")))
