"""Byte-level BPE tokenizer.json files in the Llama 3 and Qwen2 styles, against HF `tokenizers`.

No such tokenizer ships in ../shared/data, so each is trained here with the `tokenizers`
library (installed with transformers) in the layout those model families use: a Split
pre-tokenizer with the family's own regex, then ByteLevel without a regex; Llama 3 adds
<|begin_of_text|> through a TemplateProcessing post-processor; Qwen2 normalises to NFC. The
oracle is `tokenizers` itself, reading the very same file.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from helpers.assets import ROOT, require_module
from helpers.tokenizers import VARIED
from zoo.tokenizers import load_tokenizer

# The split regexes published in Meta's Llama 3 and Alibaba's Qwen2 tokenizer.json files.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
STYLES = {
    "llama3": dict(pattern=LLAMA3_PATTERN, nfc=False, bos="<|begin_of_text|>",
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], eos="<|eot_id|>"),
    "qwen2": dict(pattern=QWEN2_PATTERN, nfc=True, bos=None,
                  specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>"),
}
MORE = ["e\u0301t\u00e9 cafe\u0301 A\u030a", "12345678901 and 3.14159", "x\r\ny\n\n\nz", "\u00c5ngstr\u00f6m"]


def corpus() -> list[str]:
    """Training text: the project's docs and the varied strings, so merges cover real words."""
    docs = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))]
    return docs + VARIED * 3


@lru_cache(maxsize=None)
def trained(style: str, folder: Path) -> Path:
    """A tokenizer.json of `style` trained on `corpus()`, in an HF folder; returns the folder."""
    tokenizers = require_module("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = STYLES[style]
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    if spec["nfc"]:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=spec["specials"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if spec["bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", special_tokens=[(spec["bos"], tok.token_to_id(spec["bos"]))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": spec["eos"]}))
    return folder


@pytest.fixture(scope="module", params=sorted(STYLES))
def pair(request, tmp_path_factory):
    """(style, kvzoo's tokenizer, the `tokenizers` oracle) from one trained file."""
    tokenizers = require_module("tokenizers")
    folder = trained(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_tokenizer(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_agrees_with_tokenizers_on_varied_text(pair):
    style, ours, oracle = pair
    for text in VARIED + MORE:
        expected = oracle.encode(text).ids  # special tokens recognised, BOS per the post-processor
        assert ours.encode(text, allow_special=True) == expected, (style, text)
        assert ours.decode(expected) == oracle.decode(expected, skip_special_tokens=False), (style, text)


def test_bos_eos_and_specials_come_from_the_file(pair):
    style, ours, oracle = pair
    spec = STYLES[style]
    assert ours.eos_ids == {oracle.token_to_id(spec["eos"])}
    assert set(ours.special_tokens) == set(spec["specials"])
    if spec["bos"]:  # Llama 3: the post-processor puts BOS first, so encode does too
        assert ours.bos_id == oracle.token_to_id(spec["bos"]) and ours.add_bos
        assert ours.encode("hi")[0] == ours.bos_id
    else:
        assert ours.bos_id is None and not ours.add_bos
    assert ours.vocab_size == oracle.get_vocab_size()


def test_nfc_normalisation_only_where_the_file_asks(pair):
    style, ours, oracle = pair
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    assert ours.encode(decomposed) == oracle.encode(decomposed).ids
    assert (ours.encode(decomposed) == ours.encode(composed)) == STYLES[style]["nfc"]


@settings(max_examples=150)
@given(st.text(max_size=40))
def test_agrees_with_tokenizers_on_random_text(pair, text):
    style, ours, oracle = pair
    ids = ours.encode(text, allow_special=True)
    assert ids == oracle.encode(text).ids
    assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}),
     "pre_tokenizer 'Metaspace'"),
    (lambda d: d["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC'"),
    (lambda d: d.update(decoder={"type": "Metaspace"}), "decoder 'Metaspace'"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), "pre_tokenizer 'Sequence'"),
])
def test_what_kvzoo_would_not_reproduce_is_refused_by_name(tmp_path, change, message):
    folder = trained("llama3", tmp_path / "src")
    data = json.loads((folder / "tokenizer.json").read_text())
    change(data)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"not a byte-level BPE kvzoo reproduces exactly.*{message}"):
        load_tokenizer(bad)
