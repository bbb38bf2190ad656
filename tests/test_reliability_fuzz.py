"""Fuzzing the loaders (tests/fuzz/loaders.py) in a child interpreter: a damaged safetensors
file, GGUF file or tokenizer file loads as what an independent reader makes of it, or is a
named error; a crash of the child fails this test instead of killing pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loaders_survive_byte_flips_and_truncations():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(ROOT / "tests" / "fuzz" / "loaders.py")],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert result.returncode == 0, (f"fuzzing the loaders failed or crashed (exit {result.returncode}):\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}")
    assert "passed" in result.stdout and "failed" not in result.stdout
