"""`kvzoo generate` end to end on the real stories260K model.

The reply printed must be sentencepiece's decode (tok512.model, the same vocabulary) of the
tokens the generation loop picks; statistics go to stderr in mlx_lm.generate's format.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest
from helpers.assets import ROOT, require_asset

import zoo
from zoo.cli import main
from zoo.cli.generate import parse_cache_options, parse_value

OPENING = "Once upon a time"
N = 24


@pytest.fixture(scope="module")
def gguf():
    return str(require_asset("stories260K/stories260K.gguf"))


@pytest.fixture(scope="module")
def sp():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(require_asset("stories260K/tok512.model")))


@pytest.fixture(scope="module")
def greedy_text(gguf, sp):
    """The greedy reply by the oracle's tokenizer and the (separately tested) generation loop."""
    model = zoo.load_model(gguf)
    prompt = [sp.bos_id()] + sp.encode(OPENING)
    tokens = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=N)]
    assert sp.eos_id() not in tokens
    o = sp.piece_to_id("o")  # decode after a spaceless piece, so the reply keeps its first space
    return sp.decode([o] + tokens)[1:]


def generate(capsys, *args):
    status = main(["generate", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_greedy_reply_on_stdout_and_stats_on_stderr(capsys, gguf, greedy_text):
    status, out, err = generate(capsys, "--model", gguf, "--prompt", OPENING, "--max-tokens", str(N))
    assert status == 0
    assert out == greedy_text + "\n"
    assert "Lily" in out or "girl" in out or "boy" in out  # a story, not noise
    lines = err.strip().splitlines()
    assert re.fullmatch(r"Prompt: 5 tokens, [\d.]+ tokens-per-sec", lines[0])
    assert re.fullmatch(rf"Generation: {N} tokens, [\d.]+ tokens-per-sec", lines[1])
    assert re.fullmatch(r"Peak memory: [\d.]+ GB", lines[2])
    assert lines[3] == "Finish: length"


def test_every_cache_and_option_prints_the_same_greedy_reply(capsys, gguf, greedy_text):
    for extra in (["--cache", "concat"], ["--cache", "preallocated", "--cache-opt", "step=5"],
                  ["--cache", "rotating", "--cache-opt", "max_size=64", "--cache-opt", "keep=4"],  # fits: exact
                  ["--prefill-step", "2"], ["--top-k", "1", "--temp", "1.0", "--seed", "3"]):
        status, out, _ = generate(capsys, "--model", gguf, "--prompt", OPENING, "--max-tokens", str(N), *extra)
        assert (status, out) == (0, greedy_text + "\n"), extra


def test_dtype_auto_is_float32_on_cpu_and_can_be_chosen(capsys, gguf, greedy_text, monkeypatch):
    import zoo.checkpoints.loading

    loaded = []
    real_load = zoo.checkpoints.loading.load
    monkeypatch.setattr(zoo.checkpoints.loading, "load", lambda path, dtype=None: loaded.append(dtype) or real_load(path, dtype=dtype))
    for choice in ("auto", "float32", "stored"):  # the GGUF stores float32: one greedy reply
        status, out, _ = generate(capsys, "--model", gguf, "--prompt", OPENING, "--max-tokens", str(N),
                                  "--dtype", choice)
        assert (status, out) == (0, greedy_text + "\n"), choice
    status, out, _ = generate(capsys, "--model", gguf, "--prompt", OPENING, "--max-tokens", "8",
                              "--dtype", "bfloat16")
    assert status == 0 and out.strip()
    assert loaded == [mx.float32, mx.float32, None, mx.bfloat16]  # auto: float32 on the CPU


def test_stop_string_cuts_the_reply(capsys, gguf, greedy_text):
    assert "." in greedy_text
    status, out, err = generate(capsys, "--model", gguf, "--prompt", OPENING, "--max-tokens", str(N),
                                "--stop", ".")
    assert status == 0
    assert out == greedy_text[: greedy_text.index(".")] + "\n"
    assert "Finish: stop" in err


def test_seeded_sampling_is_reproducible(capsys, gguf):
    args = ["--model", gguf, "--prompt", OPENING, "--max-tokens", "30", "--temp", "1.0", "--top-p", "0.9"]
    first = generate(capsys, *args, "--seed", "4")[1]
    assert generate(capsys, *args, "--seed", "4")[1] == first
    assert generate(capsys, *args, "--seed", "5")[1] != first


@pytest.mark.parametrize("extra, message", [
    (["--top-p", "1.5"], "top_p"),
    (["--temp", "-1"], "temperature"),
    (["--cache", "ring"], "unknown cache 'ring'"),
    (["--cache-opt", "size=4"], "size"),
    (["--cache-opt", "step"], "KEY=VALUE"),
    (["--cache", "quantized"], "group_size"),  # no group size fits 8-wide heads
    (["--repetition-penalty", "0"], "penalty"),
])
def test_bad_options_are_reported_without_output(capsys, gguf, extra, message):
    status, out, err = generate(capsys, "--model", gguf, "--prompt", OPENING, *extra)
    assert status == 2 and out == ""
    assert message in err


def test_an_unknown_dtype_is_refused_by_the_parser(capsys, gguf):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", gguf, "--prompt", OPENING, "--dtype", "int8"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert "invalid choice: 'int8'" in err and "float32" in err


def test_missing_model_is_reported(capsys, tmp_path):
    status, out, err = generate(capsys, "--model", str(tmp_path / "nothing.gguf"), "--prompt", "hi")
    assert status == 2 and out == "" and "nothing.gguf" in err


def test_as_a_command_reading_the_prompt_from_stdin(gguf, greedy_text):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "zoo.cli", "generate", "--model", gguf, "--prompt", "-",
                           "--max-tokens", str(N)], input=OPENING, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == greedy_text + "\n"
    assert "tokens-per-sec" in done.stderr and "tokens-per-sec" not in done.stdout


@pytest.mark.parametrize("text, value", [
    ("4", 4), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False),
    ("none", None), ("null", None), ("int8", "int8"), ("", ""),
])
def test_cache_option_values(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_cache_options_parse_and_refuse_malformed_pairs():
    assert parse_cache_options(["max_size=256", "keep=4", "bits=None"]) == {"max_size": 256, "keep": 4, "bits": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_cache_options(["=3"])
    with pytest.raises(ValueError, match="twice"):
        parse_cache_options(["step=1", "step=2"])
