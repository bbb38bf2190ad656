"""llama.cpp itself as the oracle, where its binaries are installed (they are not a Python
package and CI does not build them: these tests skip there with the reason, and
docs/performance.md records the run). Point KVZOO_LLAMA_CPP at the folder holding
`llama-simple` (llama.cpp's build/bin), or put it on PATH.

llama-simple decodes greedily. On the real stories260K file it must print kvzoo's greedy text,
and on the copy kvzoo writes (zoo.checkpoints.gguf_write, which `kvzoo bench --vs-llamacpp`
hands to llama-bench) it must print the same text again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.assets import require_asset

import zoo
from zoo.checkpoints.gguf_write import write_gguf

PROMPT = "Once upon a time, there was a little girl named Lily."
TOKENS = 48


def _llama_simple() -> Path:
    folder = os.environ.get("KVZOO_LLAMA_CPP")
    found = (shutil.which("llama-simple", path=folder) if folder else shutil.which("llama-simple"))
    if found is None:
        pytest.skip("llama.cpp's llama-simple is not installed (set KVZOO_LLAMA_CPP to its build/bin)")
    return Path(found)


def _llama_cpp_greedy(binary: Path, gguf: Path) -> str:
    done = subprocess.run([str(binary), "-m", str(gguf), "-n", str(TOKENS), PROMPT],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _kvzoo_greedy(gguf: Path) -> str:
    model, tokenizer = zoo.load(gguf)
    return zoo.generate(model, tokenizer, PROMPT, max_tokens=TOKENS)  # greedy by default


def test_llama_cpp_and_kvzoo_decode_stories260k_to_the_same_text(tmp_path):
    binary = _llama_simple()
    source = require_asset("stories260K/stories260K.gguf")
    ours = _kvzoo_greedy(source)
    theirs = _llama_cpp_greedy(binary, source)
    assert len(ours) > 40
    assert ours.strip() in theirs  # llama-simple prints the prompt, then the reply

    copy = write_gguf(zoo.load_model(source), tmp_path / "copy.gguf", "F32", tokenizer=source)
    assert _llama_cpp_greedy(binary, copy) == theirs
