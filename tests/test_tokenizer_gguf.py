"""kvzoo's tokenizer from stories260K.gguf's vocabulary against sentencepiece on tok512.model.

The two files hold the same 512 pieces and scores. tok512.model's normaliser removes extra
whitespace (leading, trailing, repeated spaces); the GGUF vocabulary is used the way llama.cpp
uses it, which keeps every space. So:

- on text without leading, trailing or repeated spaces, both must give the same ids;
- on any text, the GGUF tokenizer must equal sentencepiece running the same model with
  `remove_extra_whitespaces` switched off (the only normaliser difference), and round-trip.
"""

from __future__ import annotations


import pytest
from hypothesis import given, settings, strategies as st

from helpers.assets import require_asset
from helpers.tokenizers import gguf_tokenizer, sentencepiece_oracle
from zoo.tokenizers.gguf import tokenizer_from_gguf
from zoo.tokenizers.spm import SentencePieceTokenizer, load_sentencepiece
from zoo.tokenizers import load_tokenizer

STORIES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the sunshine.",
    'One day, she saw a big, red ball. "Can I play?" she asked.',
    "Tom and Sam were best friends. They liked to run, jump and laugh!",
    "The cat sat on the mat; the dog didn't.",
    "1 2 3 4 5 6 7 8 9 10 100 2024",
    "Hello world",
    "a",
    "UPPER lower MiXeD",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues",
    "café naïve résumé",
    "日本語 中文 한국어",
    "emoji 🙂 and 😀🎉",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "<s> and </s> are written here as text",
    "x" * 50,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Punctuation!? (parentheses) [brackets] {braces} ... --- ___",
]

# (text, pieces kvzoo must give: every space kept, one "▁" prefixed;
#  pieces sentencepiece gives with tok512's normaliser: spaces trimmed and collapsed;
#  the text sentencepiece's round trip gives back)
WHITESPACE = [
    ("", [], [], ""),
    (" ", ["▁", "▁"], [], ""),
    ("   ", ["▁", "▁", "▁", "▁"], [], ""),
    (" a", ["▁", "▁a"], ["▁a"], "a"),
    ("a ", ["▁a", "▁"], ["▁a"], "a"),
    ("a  b", ["▁a", "▁", "▁b"], ["▁a", "▁b"], "a b"),
    ("  the   end  ", ["▁", "▁", "▁the", "▁", "▁", "▁e", "nd", "▁", "▁"], ["▁the", "▁e", "nd"], "the end"),
    ("\n", ["▁", "<0x0A>"], ["▁", "<0x0A>"], "\n"),
    ("a \n b", ["▁a", "▁", "<0x0A>", "▁b"], ["▁a", "▁", "<0x0A>", "▁b"], "a \n b"),
]


def test_vocabulary_matches_the_sentencepiece_model():
    tok, sp = gguf_tokenizer(), sentencepiece_oracle()
    assert tok.vocab_size == sp.get_piece_size() == 512
    assert tok.pieces == [sp.id_to_piece(i) for i in range(512)]
    assert (tok.bos_id, set(tok.eos_ids), tok.unk_id) == (sp.bos_id(), {sp.eos_id()}, sp.unk_id()) == (1, {2}, 0)
    assert tok.add_bos


@pytest.mark.parametrize("text", STORIES)
def test_agrees_with_sentencepiece_on_normalised_text(text):
    tok, sp = gguf_tokenizer(), sentencepiece_oracle()
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text


def words_text():
    """Text whose spaces are single and inner only: where the two normalisations agree."""
    word = st.text(st.characters(blacklist_characters=" ", blacklist_categories=("Cs",)), min_size=1, max_size=8)
    return st.lists(word, max_size=6).map(" ".join)


@settings(max_examples=300)
@given(words_text())
def test_agrees_with_sentencepiece_on_random_text(text):
    tok, sp = gguf_tokenizer(), sentencepiece_oracle()
    assert tok.encode(text, add_bos=False) == sp.encode(text)


@settings(max_examples=300)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=30))
def test_equals_sentencepiece_without_whitespace_removal_and_round_trips(text):
    # (A literal "▁" in the text is SentencePiece's space symbol: it comes back as " ".)
    tok, sp = gguf_tokenizer(), sentencepiece_oracle(remove_extra_whitespaces=False)
    ids = tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text


@pytest.mark.parametrize("text, ours, theirs, their_round_trip", WHITESPACE)
def test_whitespace_each_does_what_its_normaliser_says(text, ours, theirs, their_round_trip):
    tok, sp = gguf_tokenizer(), sentencepiece_oracle()
    assert [tok.pieces[i] for i in tok.encode(text, add_bos=False)] == ours
    assert [sp.id_to_piece(i) for i in sp.encode(text)] == theirs
    assert tok.decode(tok.encode(text)) == text  # every space survives
    assert sp.decode(sp.encode(text)) == their_round_trip


def test_literal_space_symbol_decodes_as_a_space_as_in_sentencepiece():
    tok, sp = gguf_tokenizer(), sentencepiece_oracle(remove_extra_whitespaces=False)
    ids = tok.encode("a\u2581b", add_bos=False)
    assert ids == sp.encode("a\u2581b")
    assert tok.decode(ids) == sp.decode(ids) == "a b"


def test_byte_fallback_for_characters_outside_the_vocabulary():
    tok = gguf_tokenizer()
    ids = tok.encode("日", add_bos=False)
    assert [tok.pieces[i] for i in ids] == ["▁", "<0xE6>", "<0x97>", "<0xA5>"]
    assert tok.decode(ids) == "日"


@settings(max_examples=200)
@given(st.lists(st.integers(1, 511), max_size=12))
def test_decode_of_any_ids_matches_sentencepiece(ids):
    # Control tokens vanish, byte pieces join into UTF-8 (broken sequences become U+FFFD), and
    # the first word piece loses the one space encoding prefixed.
    assert gguf_tokenizer().decode(ids) == sentencepiece_oracle(remove_extra_whitespaces=False).decode(ids)


def test_unknown_token_decodes_to_sentencepiece_default_surface():
    # GGUF carries no unknown surface; tok512.model's own is an odd escaped string, so compare
    # with sentencepiece's documented default " ⁇ ".
    assert gguf_tokenizer().decode([0]) == " \u2047 "


def test_special_tokens_in_text_only_when_allowed():
    tok = gguf_tokenizer()
    plain = tok.encode("</s>", add_bos=False)
    assert 2 not in plain and tok.decode(plain) == "</s>"
    assert tok.encode("hi</s>", add_bos=False, allow_special=True) == tok.encode("hi", add_bos=False) + [2]
    assert tok.decode([1, 2]) == ""


def test_sentencepiece_backend_is_sentencepiece():
    folder = require_asset("stories260K")
    tok = load_sentencepiece(folder / "tok512.model")
    sp = sentencepiece_oracle()
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.leading_space == "drop_while_empty"
    for text in STORIES + [case[0] for case in WHITESPACE]:
        assert tok.encode(text) == [1] + sp.encode(text)


def test_load_tokenizer_picks_sentencepiece_from_tokenizer_model(tmp_path):
    import shutil

    shutil.copy(require_asset("stories260K/tok512.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("Hello world") == sentencepiece_oracle().encode("Hello world")  # no BOS
    assert tok.eos_ids == {2, 5}


def test_bad_metadata_is_a_clear_error():
    tok = gguf_tokenizer()
    good = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tok.pieces,
            "tokenizer.ggml.scores": tok.scores, "tokenizer.ggml.token_type": tok.types}
    assert tokenizer_from_gguf(good).encode("Hello") == tok.encode("Hello")
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenizer_from_gguf({})
    with pytest.raises(ValueError, match="'gpt2'.*SentencePiece"):
        tokenizer_from_gguf({**good, "tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="as many scores"):
        tokenizer_from_gguf({**good, "tokenizer.ggml.scores": tok.scores[:-1]})
    with pytest.raises(ValueError, match="eos token id 600"):
        tokenizer_from_gguf({**good, "tokenizer.ggml.eos_token_id": 600})
