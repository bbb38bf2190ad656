"""kvzoo's GPT-2 tokenizer against transformers' GPT2TokenizerFast on the real GPT-2 files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from helpers.assets import require_asset
from helpers.tokenizers import VARIED, hf_gpt2, kvzoo_gpt2
from zoo.tokenizers.bpe import load_bpe
from zoo.tokenizers import load_tokenizer

def test_hello_world_ids_from_both_file_formats():
    folder = require_asset("gpt2-tokenizer")
    assert kvzoo_gpt2().encode("Hello world") == [15496, 995]
    from_tiktoken = load_bpe(folder, folder / "gpt2.tiktoken")
    assert from_tiktoken.encode("Hello world") == [15496, 995]


def test_tiktoken_file_gives_identical_ids_and_vocabulary(tmp_path):
    folder = require_asset("gpt2-tokenizer")
    # A folder with only the .tiktoken file and the special-token maps: picked by load_tokenizer.
    for name in ("gpt2.tiktoken", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    from_tiktoken = load_tokenizer(tmp_path)
    hf_files = kvzoo_gpt2()
    assert from_tiktoken.vocab_size == hf_files.vocab_size == 50257
    assert from_tiktoken.special_tokens == hf_files.special_tokens == {"<|endoftext|>": 50256}
    assert from_tiktoken.eos_ids == hf_files.eos_ids == {50256}
    for text in VARIED:
        assert from_tiktoken.encode(text, allow_special=True) == hf_files.encode(text, allow_special=True)
    assert from_tiktoken.encoding._mergeable_ranks == hf_files.encoding._mergeable_ranks


@pytest.mark.parametrize("text", VARIED)
def test_agrees_with_transformers_on_varied_text(text):
    hf = hf_gpt2()
    ours = kvzoo_gpt2()
    expected = hf.encode(text)  # HF recognises <|endoftext|> as a special token
    assert ours.encode(text, allow_special=True) == expected
    assert ours.decode(expected) == hf.decode(expected, clean_up_tokenization_spaces=False) == text


def test_special_token_text_is_ordinary_unless_allowed():
    ours = kvzoo_gpt2()
    plain = ours.encode("a<|endoftext|>b")
    assert 50256 not in plain
    assert ours.decode(plain) == "a<|endoftext|>b"
    assert ours.encode("a<|endoftext|>b", allow_special=True) == [64, 50256, 65]


def test_bos_eos_and_defaults():
    ours = kvzoo_gpt2()
    assert ours.bos_id == 50256 and ours.eos_ids == {50256}
    assert ours.encode("hi") == ours.encode("hi", add_bos=False)  # GPT-2 adds no BOS by default
    assert ours.encode("hi", add_bos=True) == [50256] + ours.encode("hi")


@settings(max_examples=150)
@given(st.text(max_size=40))
def test_agrees_with_transformers_on_random_text(text):
    ours, hf = kvzoo_gpt2(), hf_gpt2()
    ids = ours.encode(text, allow_special=True)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == text


@settings(max_examples=100)
@given(st.lists(st.integers(0, 50256), max_size=12))
def test_decode_of_any_ids_matches_transformers(ids):
    # Random ids split multi-byte characters; both must replace broken UTF-8 the same way.
    expected = hf_gpt2().decode(ids, clean_up_tokenization_spaces=False)
    assert kvzoo_gpt2().decode(ids) == expected


def test_bad_ids_and_text_are_rejected():
    ours = kvzoo_gpt2()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([50257])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([-1])
    with pytest.raises(TypeError, match="needs a str"):
        ours.encode(b"bytes")


def test_merge_order_mismatch_is_a_clear_error(tmp_path):
    import json

    folder = require_asset("gpt2-tokenizer")
    vocab = json.loads((folder / "vocab.json").read_text())
    # Swap the ids of the first two merge results: ranks would no longer follow the merges.
    a, b = "Ġt", "Ġa"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    shutil.copy(folder / "merges.txt", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="merge order"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_files_name_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*vocab.json.*merges.txt.*tiktoken"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(Path(tmp_path) / "absent")


def test_tokenizer_json_alone_as_transformers_saves_it(tmp_path):
    # transformers 5 saves a GPT-2 tokenizer as tokenizer.json (+ tokenizer_config.json) only.
    hf = hf_gpt2()
    hf.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    ours = load_tokenizer(tmp_path)
    assert ours.vocab_size == 50257 and ours.special_tokens == {"<|endoftext|>": 50256}
    assert ours.bos_id == 50256 and ours.eos_ids == {50256}
    for text in VARIED:
        assert ours.encode(text, allow_special=True) == hf.encode(text)


def test_tokenizer_json_of_another_kind_is_refused(tmp_path):
    import json

    hf_gpt2().save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a byte-level BPE kvzoo reproduces exactly.*Metaspace"):
        load_tokenizer(tmp_path)
