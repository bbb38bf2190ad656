"""Loaders and tokenizers: a broken file is an error naming the file and what is wrong in it,
never a model or tokenizer that silently computes something else (issue 9's classes)."""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import sys

import mlx.core as mx
import numpy as np
import pytest

import caches
import zoo
from helpers.assets import require_asset, require_module
from zoo.checkpoints import gguf
from zoo.cli import main as cli

VOCAB = 80


def tiny(family: str, **overrides):
    shapes = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_positions=64, init_std=0.2)
    shapes.update(d_ff=128) if family == "gpt2" else shapes.update(n_kv_heads=2, d_ff=48)
    return zoo.build(family, **{**shapes, **overrides})


def saved(tmp_path, family="llama", name="m"):
    return zoo.save(tiny(family), tmp_path / name)


def rewrite(folder, *, config=None, weights=None):
    """Change config.json fields and/or tensors of a saved folder."""
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        data.update(config)
        (folder / "config.json").write_text(json.dumps(data))  # json writes NaN as NaN (as Python reads it)
    if weights is not None:
        tensors = dict(mx.load(str(folder / "model.safetensors")))
        for name, change in weights.items():
            tensors[name] = change(tensors[name])
        mx.save_safetensors(str(folder / "model.safetensors"), tensors, metadata={"format": "pt"})


def poison(index, value):
    def change(a):
        flat = np.array(a).reshape(-1)
        flat[index] = value
        return mx.array(flat.reshape(a.shape))
    return change


# -- non-finite weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_safetensors_weight_is_named(tmp_path, value):
    folder = saved(tmp_path)
    rewrite(folder, weights={"model.layers.1.mlp.up_proj.weight": poison(7, value)})
    with pytest.raises(ValueError) as raised:
        zoo.load_model(folder)
    message = str(raised.value)
    assert "model.safetensors" in message and "'model.layers.1.mlp.up_proj.weight'" in message
    assert ("1 NaN" if math.isnan(value) else "1 inf") in message


@pytest.fixture()
def stories(tmp_path):
    source = require_asset("stories260K/stories260K.gguf")
    path = tmp_path / "stories.gguf"
    shutil.copy(source, path)
    path.chmod(0o644)
    return path


def patch_tensor(path, name, index, value):
    """Overwrite one float32 value of a GGUF tensor in place (found through the checked header)."""
    kind, dims, start = gguf.check_file(path)[name]
    assert kind == 0  # F32
    with open(path, "r+b") as f:
        f.seek(start + 4 * index)
        f.write(struct.pack("<f", value))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gguf_tensor_is_named(stories, value):
    patch_tensor(stories, "blk.3.ffn_down.weight", 11, value)
    with pytest.raises(ValueError, match=r"stories\.gguf: tensor 'blk\.3\.ffn_down\.weight' holds non-finite"):
        zoo.load(stories)
    with pytest.raises(ValueError, match="blk.3.ffn_down.weight"):  # and through the CLI
        zoo.load_model(stories)


def patch_gguf_float(path, key, value):
    """Overwrite the float32 value of metadata `key` in a GGUF header."""
    data = path.read_bytes()
    encoded = struct.pack("<Q", len(key)) + key.encode()
    at = data.index(encoded) + len(encoded)
    assert struct.unpack_from("<I", data, at)[0] == 6  # float32
    path.write_bytes(data[:at + 4] + struct.pack("<f", value) + data[at + 8:])


@pytest.mark.parametrize("value", [float("nan"), -1e-5, 0.0, float("inf")])
def test_gguf_epsilon_out_of_range_is_named(stories, value):
    patch_gguf_float(stories, "llama.attention.layer_norm_rms_epsilon", value)
    with pytest.raises(ValueError, match=r"stories\.gguf: GGUF metadata 'llama\.attention\.layer_norm_rms_epsilon' "
                                         r"must be a finite number > 0"):
        zoo.load_model(stories)


@pytest.mark.parametrize("family, field", [("llama", "rms_norm_eps"), ("gpt2", "layer_norm_epsilon"),
                                           ("llama", "rope_theta")])
@pytest.mark.parametrize("value", [float("nan"), -1e-6, 0, "1e-5", True])
def test_config_numbers_out_of_range_are_named(tmp_path, family, field, value):
    folder = saved(tmp_path, family)
    rewrite(folder, config={field: value})
    with pytest.raises(ValueError, match=rf"config\.json: {field} must be a finite number > 0"):
        zoo.load_model(folder)


def test_config_errors_name_the_file(tmp_path):
    folder = saved(tmp_path)
    rewrite(folder, config={"num_hidden_layers": float("nan")})
    with pytest.raises(ValueError, match=r"config\.json: "):
        zoo.load_model(folder)


def test_model_config_refuses_nan_numbers():
    for field in ("norm_eps", "rope_base", "rope_scale", "init_std"):
        with pytest.raises(ValueError, match=f"{field} must be a finite number > 0, got nan"):
            zoo.build("llama", preset="tiny", **{field: float("nan")})


def test_check_model_says_the_logits_are_nan(stories, capsys):
    """Finite weights whose forward overflows (the final norm's gains at 3e38): the loader
    accepts them; `kvzoo check --model` says the logits are NaN, not a rounding-flip story."""
    for i in range(64):
        patch_tensor(stories, "output_norm.weight", i, 3e38)
    model = zoo.load_model(stories)
    assert not mx.all(mx.isfinite(model(mx.array([[1, 2, 3]])))).item()  # the premise
    assert cli(["check", "--model", str(stories)]) == 2
    err = capsys.readouterr().err
    assert "the model's logits are NaN or infinite on this prompt" in err and "stories.gguf" in err


# -- safetensors files that are not safetensors -------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:5], "only 5 bytes"),
    (lambda b: struct.pack("<Q", 10**12) + b[8:], "header claims"),
    (lambda b: b[:8] + b"[" + b[9:], "not JSON"),
    (lambda b: b[:-7], "lies at bytes"),
])
def test_corrupt_safetensors_is_named(tmp_path, damage, message):
    folder = saved(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as raised:
        zoo.load_model(folder)
    assert "model.safetensors" in str(raised.value)


def test_zoo_load_needs_a_path():
    with pytest.raises(TypeError, match="got NoneType None"):
        zoo.load(None)
    with pytest.raises(TypeError, match="got int"):
        zoo.load_model(3)


# -- tokenizers ----------------------------------------------------------------------------------


@pytest.fixture()
def gpt2_folder(tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(require_asset("gpt2-tokenizer"), folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def test_added_pad_token_gets_a_new_id_as_transformers_gives_it(gpt2_folder):
    transformers = require_module("transformers")
    special = json.loads((gpt2_folder / "special_tokens_map.json").read_text())
    special["pad_token"] = "<pad>"
    special["additional_special_tokens"] = ["<|im_start|>"]
    (gpt2_folder / "special_tokens_map.json").write_text(json.dumps(special))
    ours = zoo.load_tokenizer(gpt2_folder)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    for token in ("<pad>", "<|im_start|>", "<|endoftext|>"):
        assert ours.special_tokens[token] == theirs.convert_tokens_to_ids(token), token
    assert ours.special_tokens["<pad>"] != ours.special_tokens["<|endoftext|>"]
    assert len(set(ours.special_tokens.values())) == len(ours.special_tokens)
    text = "Hello<pad> world<|im_start|>"
    assert ours.encode(text, allow_special=True) == theirs.encode(text)


def test_merges_cut_short_are_refused(gpt2_folder):
    lines = (gpt2_folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    (gpt2_folder / "merges.txt").write_text("\n".join(lines[:1001]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json \+ merges\.txt: 49000 vocabulary entries are neither a "
                                         r"byte, a merge result nor a special token.*cut short"):
        zoo.load_tokenizer(gpt2_folder)


def test_a_merge_of_an_unmade_token_is_refused(gpt2_folder):
    lines = (gpt2_folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    del lines[1]  # the first merge ("Ġ t"), which later merges build on
    (gpt2_folder / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"uses 'Ġt', which is neither a byte nor made by an earlier merge"):
        zoo.load_tokenizer(gpt2_folder)


@pytest.mark.parametrize("name, content, message", [
    ("vocab.json", b"{not json", r"vocab\.json is not valid JSON"),
    ("vocab.json", b"\xff\xfe{}", r"vocab\.json is not UTF-8"),
    ("vocab.json", b"[1, 2]", r"vocab\.json must hold a JSON object|the vocabulary must be a JSON object"),
    ("vocab.json", b'{"a": "x"}', r"token 'a' has id 'x'"),
    ("special_tokens_map.json", b"{", r"special_tokens_map\.json is not valid JSON"),
    ("merges.txt", b"\xff\xff", r"merges\.txt is not UTF-8"),
])
def test_corrupt_tokenizer_files_are_named(gpt2_folder, name, content, message):
    (gpt2_folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        zoo.load_tokenizer(gpt2_folder)


@pytest.mark.parametrize("content, message", [
    (b"{", r"tokenizer\.json is not valid JSON"),
    (b'{"model": [1]}', r"tokenizer\.json: 'model' must be a JSON object"),
    (b'{"model": {"type": "BPE", "vocab": {}, "merges": 3}, "pre_tokenizer": {"type": "ByteLevel"}}',
     r"tokenizer\.json: model\.merges must be a list"),
])
def test_corrupt_tokenizer_json_is_named(tmp_path, content, message):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        zoo.load_tokenizer(tmp_path)


def test_load_tokenizer_given_a_file_says_so(gpt2_folder):
    with pytest.raises(ValueError, match=r"vocab\.json is a file; load_tokenizer takes the folder"):
        zoo.load_tokenizer(gpt2_folder / "vocab.json")
    with pytest.raises(TypeError, match="got NoneType"):
        zoo.load_tokenizer(None)


def all_tokenizers():
    from zoo.tokenizers import load_sentencepiece

    gpt2 = zoo.load_tokenizer(require_asset("gpt2-tokenizer"))
    spm = load_sentencepiece(require_asset("stories260K/tok512.model"))
    _, gguf_tok = zoo.load(require_asset("stories260K/stories260K.gguf"))
    return {"gpt2": gpt2, "sentencepiece": spm, "gguf": gguf_tok}


@pytest.mark.parametrize("text, position", [("Hello\ud800 world", 5), ("\udfff", 0), ("ab c\udc80", 4)])
def test_lone_surrogates_are_one_error_for_every_tokenizer(text, position):
    for name, tok in all_tokenizers().items():
        with pytest.raises(ValueError, match=rf"lone surrogate U\+[0-9A-F]{{4}} at character {position} ") as raised:
            tok.encode(text)
        assert f"U+{ord(text[position]):04X}" in str(raised.value), name
        with pytest.raises(ValueError, match="lone surrogate"):
            tok.encode(text, allow_special=True)


def test_tokenizer_larger_than_the_model_is_refused_at_load(tmp_path):
    folder = saved(tmp_path, "gpt2")  # a vocabulary of 80
    for f in require_asset("gpt2-tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    with pytest.raises(ValueError, match="do not match: the tokenizer has 50257 ids but the model's embedding has 80"):
        zoo.load(folder)


def test_corrupt_gguf_vocabulary_scores():
    from zoo.tokenizers import tokenizer_from_gguf

    _, metadata = mx.load(str(require_asset("stories260K/stories260K.gguf")), return_metadata=True)
    scores = metadata["tokenizer.ggml.scores"].tolist()
    scores[300] = float("nan")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.scores\[300\] .* is nan"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.scores": scores})


# -- CLI ------------------------------------------------------------------------------------------


def test_check_decode_without_model_is_refused(capsys):
    assert cli(["check", "--decode", "5"]) == 2
    assert "--decode applies with --model PATH" in capsys.readouterr().err
    assert cli(["check", "--prompt", "hi"]) == 2
    assert "--prompt applies with --model" in capsys.readouterr().err


def test_stdin_prompt_loses_its_trailing_newline(monkeypatch):
    from zoo.cli.generate import read_stdin_prompt

    for given, wanted in [("text\n", "text"), ("text\r\n", "text"), ("two\n\n", "two\n"), ("none", "none")]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(given))
        assert read_stdin_prompt() == wanted


def test_bench_out_unwritable_fails_before_the_benchmark(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli(["bench", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "is not a writable folder" in capsys.readouterr().err


def test_rotating_default_keep_adapts_to_a_small_window():
    model = zoo.build("llama", preset="tiny")
    cache = caches.make("rotating", model, max_size=4)
    assert cache[0].keep == 3 and cache[0].max_size == 4
    assert caches.make("rotating", model, max_size=1)[0].keep == 0
    assert caches.make("rotating", model)[0].keep == 4  # the documented default where it fits
    with pytest.raises(ValueError, match=r"keep \(4\) must be smaller than max_size \(4\)"):
        caches.make("rotating", model, max_size=4, keep=4)  # what the user set is not changed
    # the adapted cache is exact against its reference
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7]])
    logits = model(tokens, cache)
    oracle = model(tokens, reference=cache[0].reference)
    assert mx.allclose(logits, oracle, atol=1e-5)
