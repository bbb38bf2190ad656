"""Equal-score merges in SentencePiece-BPE: kvzoo's GGUF tokenizer breaks ties at the leftmost
pair, as sentencepiece (and llama.cpp) do. Oracle: sentencepiece on the same pieces and scores."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.assets import require_asset, require_module
from helpers.tokenizers import gguf_tokenizer, sentencepiece_oracle
from zoo.tokenizers.gguf import GGUFTokenizer

# Runs of one letter where the doubled piece exists ("ll", "oo", "pp" are pieces of tok512):
# "llll" can merge (0,1)+(2,3) or (1,2) first; the same piece at two places is a tie.
RUNS = ["ll", "lll", "llll", "lllll", "oooooooo", "ooo", "pppp", "lll ooo", "balloon", "hello", "poppy",
        "all ll lll", "oooo pppp llll"]


@pytest.mark.parametrize("text", RUNS)
def test_repeated_pieces_tie_and_merge_leftmost_first(text):
    tok, sp = gguf_tokenizer(), sentencepiece_oracle()
    assert tok.encode(text, add_bos=False) == sp.encode(text)


def test_equal_scores_between_different_pieces_break_to_the_leftmost_pair():
    """Every two-character piece given the same score: ties everywhere, on random strings."""
    sentencepiece = require_module("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(require_asset("stories260K/tok512.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = False
    tied = 0
    for piece in proto.pieces:
        if len(piece.piece) == 2 and piece.type == 1:
            piece.score, tied = -100.0, tied + 1
    assert tied > 50
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    tok = GGUFTokenizer([p.piece for p in proto.pieces], [p.score for p in proto.pieces],
                        gguf_tokenizer().types)
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdehilnorst ") for _ in range(rng.randint(2, 14))) for _ in range(1500)]
    mismatches = [t for t in texts if tok.encode(t, add_bos=False) != sp.encode(t)]
    assert mismatches == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="lopae", min_size=1, max_size=12), min_size=1, max_size=3))
def test_any_string_of_tie_prone_letters_matches_sentencepiece(words):
    """Hypothesis over words of letters whose doubles are pieces ("ll", "oo", "pp"): runs of
    every length and mixture, where equal-score merges compete everywhere. (Single spaces
    between words: sentencepiece's normalizer collapses and strips other whitespace.)"""
    text = " ".join(words)
    tok, sp = gguf_tokenizer(), sentencepiece_oracle()
    assert tok.encode(text, add_bos=False) == sp.encode(text)
