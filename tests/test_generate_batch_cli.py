"""`kvzoo generate --prompts-file`: every reply printed, one per line, each the reply that
prompt gets from `kvzoo generate --prompt` alone (tests/test_generate_cli.py checks that one
against sentencepiece and the generation loop)."""

from __future__ import annotations

import pytest
from helpers.assets import require_asset

from zoo.cli import main

PROMPTS = ["Once upon a time", "The sun", "Tom had a red ball.", "Lily saw a cat"]


@pytest.fixture(scope="module")
def gguf():
    return str(require_asset("stories260K/stories260K.gguf"))


def generate(capsys, *args):
    status = main(["generate", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("batch_size", [None, 3])
@pytest.mark.parametrize("cache", ["preallocated", "rotating"])
def test_each_line_is_the_reply_alone(capsys, gguf, tmp_path, batch_size, cache):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    extra = ["--max-tokens", "40", "--cache", cache] + (["--cache-opt", "max_size=24", "--cache-opt", "keep=2"]
                                                        if cache == "rotating" else [])
    size = [] if batch_size is None else ["--batch-size", str(batch_size)]
    status, out, err = generate(capsys, "--model", gguf, "--prompts-file", str(path), *size, *extra)
    assert status == 0
    lines = out.split("\n")
    assert lines[-1] == "" and len(lines) == len(PROMPTS) + 1
    for prompt, line in zip(PROMPTS, lines):
        alone = generate(capsys, "--model", gguf, "--prompt", prompt, *extra)[1]
        assert line == alone[:-1].replace("\\", "\\\\").replace("\n", "\\n")
    assert "Generation: 160 tokens" in err and "per row" in err and "Row 3:" in err
    assert f"batch size {batch_size or len(PROMPTS)}" in err


@pytest.mark.parametrize("content, extra, message", [
    ("a\n\nb\n", [], "line 2 is blank"),
    ("", [], "holds no prompts"),
    ("a\n", ["--prompt-lookup", "2"], "one prompt at a time"),
    ("a\n", ["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_prompt_files_are_reported_without_output(capsys, gguf, tmp_path, content, extra, message):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    status, out, err = generate(capsys, "--model", gguf, "--prompts-file", str(path), *extra)
    assert status == 2 and out == "" and message in err


def test_batch_size_needs_a_prompts_file_and_a_missing_file_is_named(capsys, gguf, tmp_path):
    status, out, err = generate(capsys, "--model", gguf, "--prompt", "hi", "--batch-size", "2")
    assert status == 2 and "--batch-size applies to --prompts-file" in err
    status, out, err = generate(capsys, "--model", gguf, "--prompts-file", str(tmp_path / "none.txt"))
    assert status == 2 and "none.txt" in err
