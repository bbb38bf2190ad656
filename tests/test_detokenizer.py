"""Streaming detokenization: pieces concatenate to the oracle's full decode, and a character
split over several tokens is released only once it is complete."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from helpers.tokenizers import gguf_tokenizer, sentencepiece_oracle
from helpers.tokenizers import hf_gpt2, kvzoo_gpt2

TEXTS = [
    "Once upon a time there was a little girl.",
    "emoji 🙂😀🎉 and a family 👨‍👩‍👧‍👦!",
    "日本語のテキスト、中文文本，한국어",
    "café naïve résumé Ångström",
    "mixed 🙂 text 日本 with é accents\nand lines",
    "🙂",
]


def spm_tokenizer():
    from helpers.assets import require_asset
    from zoo.tokenizers.spm import load_sentencepiece

    return load_sentencepiece(require_asset("stories260K/tok512.model"))


def stream(tokenizer, ids, **options):
    detok = tokenizer.detokenizer(**options)
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.finalize())
    assert detok.text == "".join(pieces)
    assert detok.tokens == list(ids)
    return pieces


def tokenizers_and_oracles():
    """(kvzoo tokenizer, the independent decode to compare with)."""
    spm = sentencepiece_oracle()
    gpt2 = hf_gpt2()
    return [
        (kvzoo_gpt2(), lambda ids: gpt2.decode(ids, clean_up_tokenization_spaces=False)),
        (gguf_tokenizer(), sentencepiece_oracle(remove_extra_whitespaces=False).decode),
        (spm_tokenizer(), spm.decode),
    ]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_valid_text_equals_decode_and_never_breaks_a_character(text):
    for tokenizer, oracle_decode in tokenizers_and_oracles():
        ids = tokenizer.encode(text)
        pieces = stream(tokenizer, ids)
        assert "".join(pieces) == oracle_decode(ids) == text
        for piece in pieces:
            assert "\ufffd" not in piece  # no half of a character ever shown as a replacement
            piece.encode("utf-8")  # and no lone surrogates


def test_multibyte_character_is_held_until_its_last_byte():
    for tokenizer in (kvzoo_gpt2(), gguf_tokenizer()):
        ids = tokenizer.encode("🙂", add_bos=False)
        pieces = stream(tokenizer, ids)
        assert len(ids) > 1  # the emoji really is split over several tokens
        text_pieces = [p for p in pieces if p]
        assert text_pieces[-1].endswith("🙂") and all("🙂" not in p for p in text_pieces[:-1])
        assert "".join(pieces).strip() == "🙂"
        # nothing is released before the last byte arrives
        assert all(p in ("", " ") for p in pieces[: len(ids) - 1])


@settings(max_examples=150)
@given(st.lists(st.integers(0, 50256), max_size=10))
def test_gpt2_stream_of_any_ids_equals_transformers_decode(ids):
    # Random ids produce broken UTF-8; the stream must replace it exactly as a full decode does.
    expected = hf_gpt2().decode(ids, clean_up_tokenization_spaces=False)
    assert "".join(stream(kvzoo_gpt2(), ids)) == expected


@settings(max_examples=200)
@given(st.lists(st.integers(0, 511), max_size=12))
def test_sentencepiece_stream_of_any_ids_equals_sentencepiece_decode(ids):
    assert "".join(stream(spm_tokenizer(), ids)) == sentencepiece_oracle().decode(ids)


@settings(max_examples=200)
@given(st.lists(st.integers(1, 511), max_size=12))
def test_gguf_stream_of_any_ids_equals_sentencepiece_decode(ids):
    oracle = sentencepiece_oracle(remove_extra_whitespaces=False)
    assert "".join(stream(gguf_tokenizer(), ids)) == oracle.decode(ids)


@settings(max_examples=100)
@given(st.lists(st.integers(3, 511), max_size=10))
def test_continuation_keeps_the_leading_space(ids):
    # A reply continues the prompt, so its first "▁word" keeps its space. Oracle: decode after
    # a piece without a space ("o"), which sentencepiece never strips, and drop that piece.
    for tokenizer, sp in ((spm_tokenizer(), sentencepiece_oracle()),
                          (gguf_tokenizer(), sentencepiece_oracle(remove_extra_whitespaces=False))):
        o = sp.piece_to_id("o")
        expected = sp.decode([o] + ids)
        assert expected.startswith("o")
        assert "".join(stream(tokenizer, ids, continuation=True)) == expected[1:]


def test_continuation_example():
    tok = gguf_tokenizer()
    ids = tok.encode("there was", add_bos=False)
    assert "".join(stream(tok, ids)) == "there was"
    assert "".join(stream(tok, ids, continuation=True)) == " there was"
    gpt2 = kvzoo_gpt2()
    ids = gpt2.encode(" there was")
    assert "".join(stream(gpt2, ids)) == "".join(stream(gpt2, ids, continuation=True)) == " there was"


def test_bad_token_and_reset():
    tok = gguf_tokenizer()
    detok = tok.detokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        detok.add_token(512)
    with pytest.raises(TypeError, match="ints"):
        detok.add_token(3.0)
    assert detok.tokens == [] and detok.text == ""
    import numpy as np

    (the,) = tok.encode("the", add_bos=False)
    assert detok.add_token(np.int64(the)) == "the"
    detok.reset()
    assert detok.tokens == [] and detok.text == ""
