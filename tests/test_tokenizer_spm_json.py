"""SentencePiece-style tokenizer.json (Llama 2, Mistral, TinyLlama: "▁" pieces, byte fallback,
a Metaspace pre-tokenizer or Llama 2's Prepend/Replace normalizer) loads through the
`tokenizers` library and encodes, decodes and streams as transformers does.

Tokenizers are trained in the test by the `tokenizers` library (no downloads); transformers'
AutoTokenizer on the same folder is the oracle for ids, BOS and decoding.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st
from helpers.assets import require_module
from helpers.hf_folders import save_sentencepiece_style
from helpers.tokenizers import VARIED

import zoo
from zoo.tokenizers import HFJsonTokenizer

STYLES = ["metaspace", "legacy"]
TEXTS = VARIED + ["</s>", "a</s>b <s> c", "<unk>", "  two leading", "\n\nnewlines first", "ends with space "]
_made: dict = {}


def folder_and_oracle(style, tmp_path_factory=None):
    """(folder, transformers' tokenizer on it), built once per style."""
    if style not in _made:
        require_module("transformers")
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp(prefix=f"spm-{style}-"))
        _made[style] = (folder, save_sentencepiece_style(folder, style))
    return _made[style]


@pytest.fixture(params=STYLES)
def pair(request):
    folder, hf = folder_and_oracle(request.param)
    return zoo.load_tokenizer(folder), hf


def test_loads_through_the_tokenizers_library(pair):
    tokenizer, hf = pair
    assert isinstance(tokenizer, HFJsonTokenizer)
    assert tokenizer.vocab_size == len(hf)
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (hf.bos_token_id, frozenset({hf.eos_token_id}))
    assert tokenizer.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_transformers(pair, text):
    tokenizer, hf = pair
    ids = tokenizer.encode(text)
    # BOS from the post-processor, as transformers adds it; special-token text is plain text
    # unless allow_special (kvzoo's convention; transformers' split_special_tokens=True).
    assert ids == hf.encode(text, split_special_tokens=True)
    assert tokenizer.encode(text, allow_special=True) == hf.encode(text)
    plain = tokenizer.encode(text, add_bos=False)
    assert plain == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert tokenizer.encode(text, add_bos=False, allow_special=True) == hf.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert any(tokenizer.token_bytes(i) and tokenizer._is_byte[i] for i in ids) or all(ord(c) < 0x3000 for c in text)


def stream(tokenizer, ids, **options):
    detok = tokenizer.detokenizer(**options)
    pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_text_equals_decode_and_never_breaks_a_character(pair, text):
    tokenizer, hf = pair
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == hf.decode(ids, skip_special_tokens=True)
    for piece in pieces:
        assert "\ufffd" not in piece


@pytest.mark.parametrize("style", STYLES)
@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_stream_of_any_ids_equals_transformers_decode(style, data):
    """Arbitrary ids: broken byte runs, specials, pieces in any order."""
    folder, hf = folder_and_oracle(style)
    tokenizer = _loaded(style)
    byte_ids = list(range(3, 259))
    ids = data.draw(st.lists(st.one_of(st.integers(0, len(hf) - 1), st.sampled_from(byte_ids)), max_size=24))
    assert "".join(stream(tokenizer, ids)) == hf.decode(ids, skip_special_tokens=True)


_tokenizers: dict = {}


def _loaded(style):
    if style not in _tokenizers:
        _tokenizers[style] = zoo.load_tokenizer(folder_and_oracle(style)[0])
    return _tokenizers[style]


def test_continuation_keeps_the_leading_space(pair):
    tokenizer, hf = pair
    prompt, reply = tokenizer.encode("Once upon a time"), tokenizer.encode(" there was a fox", add_bos=False)
    whole = hf.decode(prompt + reply, skip_special_tokens=True)
    assert whole.startswith(hf.decode(prompt, skip_special_tokens=True))
    continued = "".join(stream(tokenizer, reply, continuation=True))
    assert hf.decode(prompt, skip_special_tokens=True) + continued == whole


def test_unsupported_decoder_is_refused_by_name(tmp_path):
    folder, _ = folder_and_oracle("metaspace")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["decoder"]["decoders"] = data["decoder"]["decoders"][:2] + [{"type": "CTC", "pad_token": "<pad>",
                                                                       "word_delimiter_token": "|", "cleanup": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
    with pytest.raises(ValueError, match="decoder .*CTC.* is not one kvzoo streams exactly"):
        zoo.load_tokenizer(tmp_path)


def test_decoder_without_strip_keeps_the_leading_space(tmp_path):
    """Some conversions drop Strip from the decoder: then the first space stays, in the stream too."""
    require_module("transformers")
    from transformers import AutoTokenizer

    folder, _ = folder_and_oracle("metaspace")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["decoder"]["decoders"] = data["decoder"]["decoders"][:3]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
    tokenizer, hf = zoo.load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:12]:
        ids = tokenizer.encode(text)
        assert "".join(stream(tokenizer, ids)) == hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    assert tokenizer.decode(tokenizer.encode("Hello")).startswith(" ")
