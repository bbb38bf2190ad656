"""Byte flips and truncations of real loader inputs (run by tests/test_reliability_fuzz.py in
a child interpreter, so a crash fails that test instead of killing pytest).

Every damaged file must end in one of two ways:
- a ValueError / TypeError / FileNotFoundError whose message names the damaged file (or its
  folder), or
- a model / tokenizer equal to what an independent reader makes of the same damaged bytes
  (safetensors' own reader, gguf-py's GGUFReader, HF tokenizers) and, where the damage hit
  bytes nothing reads (padding, JSON whitespace), bit-identical to the undamaged original
  (also where the independent reader is stricter than kvzoo and refuses).
Never a crash, never a silently different model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for helpers

import zoo  # noqa: E402
from helpers.assets import require_asset, require_module  # noqa: E402

NAMED = (ValueError, TypeError, FileNotFoundError)
FUZZ = settings(max_examples=int(__import__("os").environ.get("KVZOO_FUZZ_EXAMPLES", "60")), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def damage(data: bytes, kind: str, where: float, value: int, header: int) -> bytes:
    """A flip of one byte (XOR `value`, 1..255) or a truncation; `where` in [0, 1) picks the
    position, in the header region for half the draws (where parsers live)."""
    span = header if where < 0.5 else len(data)
    at = min(int((where % 0.5) * 2 * span), len(data) - 1)
    if kind == "truncate":
        return data[:at]
    return data[:at] + bytes([data[at] ^ value]) + data[at + 1:]


damages = st.tuples(st.sampled_from(["flip", "flip", "flip", "truncate"]), st.floats(0, 0.999),
                    st.integers(1, 255))


def bits(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a.view(np.uint32)


OUTCOMES: dict[str, dict[str, int]] = {}


def count(target: str, outcome: str) -> None:
    OUTCOMES.setdefault(target, {}).setdefault(outcome, 0)
    OUTCOMES[target][outcome] += 1


def teardown_module() -> None:
    print("\nOUTCOMES", json.dumps(OUTCOMES, sort_keys=True))


def assert_named(error: Exception, *names: str) -> None:
    message = str(error)
    assert any(n in message for n in names), f"{type(error).__name__} does not name the file: {message}"


# -- safetensors ------------------------------------------------------------------------------------

_tiny = {}


def tiny_folder(tmp: Path) -> Path:
    if "folder" not in _tiny:
        model = zoo.build("llama", vocab_size=40, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=24,
                          max_positions=32, tie_embeddings=False, seed=0)
        _tiny["folder"] = zoo.save(model, tmp / "original")
        _tiny["weights"] = {k: np.array(v) for k, v in mx.load(str(_tiny["folder"] / "model.safetensors")).items()}
    return _tiny["folder"]


def test_safetensors(tmp_path_factory):
    safetensors_numpy = require_module("safetensors.numpy")
    original = tiny_folder(tmp_path_factory.mktemp("st"))
    raw = (original / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    work = tmp_path_factory.mktemp("st-damaged")

    @FUZZ
    @given(damages)
    def attempt(d):
        folder = work / "m"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(original, folder)
        damaged = damage(raw, *d, header=header)
        (folder / "model.safetensors").write_bytes(damaged)
        try:
            model = zoo.load_model(folder)
        except NAMED as error:
            assert_named(error, "model.safetensors", str(folder))
            count("safetensors", "named error")
            return
        count("safetensors", "loaded")
        from zoo.checkpoints import hf
        from zoo.checkpoints.layout import file_weights_of

        oracle = safetensors_numpy.load_file(str(folder / "model.safetensors"))  # must read what we read
        ours = {k: np.array(v) for k, v in file_weights_of(model, hf.layout(model.config, list(oracle))).items()}
        assert set(ours) <= set(oracle)
        for name, a in ours.items():
            assert np.array_equal(bits(a), bits(oracle[name])), f"{name} differs from the file's bytes"
        if set(oracle) == set(_tiny["weights"]) and all(
                np.array_equal(bits(oracle[k]), bits(v)) for k, v in _tiny["weights"].items()):
            for name, a in ours.items():  # the damage hit nothing read: bit-identical
                assert np.array_equal(bits(a), bits(_tiny["weights"][name]))
            count("safetensors", "loaded bit-identical")

    attempt()


# -- GGUF -------------------------------------------------------------------------------------------


def test_gguf(tmp_path_factory):
    gguf_py = require_module("gguf")
    source = require_asset("stories260K/stories260K.gguf")
    raw = source.read_bytes()
    header = gguf_py.GGUFReader(str(source)).data_offset
    work = tmp_path_factory.mktemp("gguf")
    original_model, original_tok = zoo.load(source)
    original_params = {k: np.array(v) for k, v in tree_flatten(original_model.parameters())}

    @FUZZ
    @given(damages)
    def attempt(d):
        path = work / "stories.gguf"
        path.write_bytes(damage(raw, *d, header=header))
        try:
            model, tok = zoo.load(path)
        except NAMED as error:
            assert_named(error, str(path))
            count("gguf", "named error")
            return
        count("gguf", "loaded")
        reader = gguf_py.GGUFReader(str(path))  # must read what we read
        from zoo.checkpoints.gguf import GGUFLlamaLayout

        layout = GGUFLlamaLayout(model.config)
        params = dict(tree_flatten(model.parameters()))
        for tensor in reader.tensors:
            name = layout.model_name(tensor.name)
            if name is None:
                continue
            assert np.array_equal(bits(params[name]), bits(np.asarray(tensor.data).reshape(params[name].shape))), name
        fields = reader.fields
        pieces = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
                  for i in fields["tokenizer.ggml.tokens"].data]
        assert tok.pieces == pieces
        scores = [float(fields["tokenizer.ggml.scores"].parts[i][0]) for i in fields["tokenizer.ggml.scores"].data]
        assert np.array_equal(np.float32(tok.scores), np.float32(scores))
        for key, value in (("llama.embedding_length", model.config.d_model),
                           ("llama.block_count", model.config.n_layers),
                           ("llama.attention.head_count", model.config.n_heads),
                           ("llama.feed_forward_length", model.config.d_ff)):
            assert int(fields[key].parts[-1][0]) == value, key
        if tok.pieces == original_tok.pieces and all(
                np.array_equal(bits(params[k]), bits(v)) for k, v in original_params.items()):
            count("gguf", "loaded bit-identical")

    attempt()


# -- byte-level BPE tokenizer files -----------------------------------------------------------------

SAMPLES = ["Hello world", " the theory of everything", "tttt eeee", "Once upon a time, there was"]


def tiny_bpe(folder: Path) -> None:
    """GPT-2's bytes and first 300 merges (ids 0..555 as in GPT-2) and <|endoftext|> at 556."""
    real = require_asset("gpt2-tokenizer")
    vocab = json.loads((real / "vocab.json").read_text(encoding="utf-8"))
    lines = (real / "merges.txt").read_text(encoding="utf-8").split("\n")
    keep = {t: i for t, i in vocab.items() if i < 556}
    keep["<|endoftext|>"] = 556
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(keep, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(lines[:301]) + "\n", encoding="utf-8")


def oracle_tokenizer(folder: Path):
    tokenizers = require_module("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_bpe_files(tmp_path_factory):
    original = tmp_path_factory.mktemp("bpe") / "tok"
    tiny_bpe(original)
    reference = zoo.load_tokenizer(original)
    oracle = oracle_tokenizer(original)
    for text in SAMPLES:  # the undamaged pair agrees with HF tokenizers
        assert reference.encode(text) == oracle.encode(text).ids
    files = {name: (original / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    work = tmp_path_factory.mktemp("bpe-damaged")

    @FUZZ
    @given(st.sampled_from(sorted(files)), damages)
    def attempt(name, d):
        folder = work / "tok"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(original, folder)
        data = files[name]
        (folder / name).write_bytes(damage(data, *d, header=len(data)))
        try:
            ours = zoo.load_tokenizer(folder)
        except NAMED as error:
            assert_named(error, str(folder))
            count("bpe " + name, "named error")
            return
        count("bpe " + name, "loaded")
        try:
            theirs = oracle_tokenizer(folder)  # reads what we read, and encodes alike
        except Exception:
            # HF refuses what we read (a "\r" line break: we read text files with universal
            # newlines): then the damage changed nothing for us, and we equal the original
            theirs = None
            count("bpe " + name, "loaded identical where HF refuses")
        for text in SAMPLES:
            expected = reference.encode(text) if theirs is None else theirs.encode(text).ids
            assert ours.encode(text) == expected, (name, d, text)

    attempt()
