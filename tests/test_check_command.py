"""`kvzoo check`, the main job."""

from __future__ import annotations

import shutil
import subprocess
import sys

import caches
import positional
import zoo
from helpers.assets import require_asset
from helpers.user_caches import ForgetfulCache
from zoo.cli import main


def test_check_runs_every_pairing_and_passes(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith(" ok") or "FAIL" in line]
    n_options = sum(len(caches.examples(n, head_dim=32, seq_len=36))
                    for n in caches.available())
    refused = [line for line in out.splitlines() if line.startswith("not run: ")]
    assert len(rows) + len(refused) == len(zoo.available()) * len(positional.available()) * 3 * n_options
    # only what a cache refuses by design, with the reason: positions inside the cache need RoPE or ALiBi
    assert refused and all(line.startswith("not run: streaming on ") and "/learned/" in line
                           and "absolute positions to the token embeddings" in line for line in refused)
    assert "FAIL" not in out
    for name in caches.available():
        assert name in out


def test_check_selects_and_fails_loudly(capsys, registered):
    registered("test-forgetful", ForgetfulCache)
    status = main(["check", "--families", "gpt2", "--positional", "alibi",
                   "--caches", "concat", "test-forgetful", "--layouts", "MQA"])
    out = capsys.readouterr().out
    assert status == 1
    lines = [line for line in out.splitlines() if line.startswith("gpt2")]
    assert len(lines) == 2
    assert lines[0].split()[3] == "concat" and lines[0].endswith("ok")
    assert lines[1].split()[3] == "test-forgetful" and lines[1].endswith("FAIL")


def test_console_script_is_installed():
    exe = shutil.which("kvzoo")
    command = [exe] if exe else [sys.executable, "-m", "zoo.cli"]
    done = subprocess.run(command + ["check", "--families", "llama", "--caches", "concat",
                                     "--layouts", "GQA"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "3/3 pairings match" in done.stdout


def table_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.endswith((" ok", " FAIL"))]


def test_check_a_real_checkpoint_with_every_cache(capsys):
    gguf = str(require_asset("stories260K/stories260K.gguf"))
    assert main(["check", "--model", gguf, "--decode", "20"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    by_cache = {}
    for row in rows:
        by_cache.setdefault(row[3].split("(")[0], []).append(row)
    assert set(by_cache) == set(caches.available())  # quantized too: groups of 8 (caches/affine.py)
    assert "not run" not in out
    for row in by_cache["concat"] + by_cache["preallocated"]:  # exact: the true model's outputs
        assert row[:3] == ["llama", "rope", "GQA"] and row[5] == "20/20" and row[7] == "exact"
    # A window smaller than the sequence changes the real model's outputs, and the table says so.
    wrapped = [row for row in by_cache["rotating"] if row[7] == "Δ"]
    assert wrapped and all(float(row[8].rstrip(",")) > 0.01 for row in wrapped)
    assert "stories260K.gguf; prompt 'Once upon a time, there was a little'" in out


def test_check_a_real_checkpoint_catches_a_broken_cache(capsys, registered):
    registered("test-forgetful", ForgetfulCache)
    gguf = str(require_asset("stories260K/stories260K.gguf"))
    status = main(["check", "--model", gguf, "--caches", "concat", "test-forgetful", "--prompt", "Tom had a dog"])
    rows = table_rows(capsys.readouterr().out)
    assert status == 1
    assert [(row[3], row[-1]) for row in rows] == [("concat", "ok"), ("test-forgetful", "FAIL")]


def test_check_model_refuses_preset_choices_and_bad_lengths(capsys, tmp_path):
    gguf = str(require_asset("stories260K/stories260K.gguf"))
    for argv, message in [
        (["--families", "gpt2"], "--families chooses among the random presets"),
        (["--decode", "0"], "--decode must be at least 1"),
        (["--prompt", ""], "give at least 2"),
        (["--caches", "ring"], "unknown cache 'ring'"),
    ]:
        assert main(["check", "--model", gguf, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    # A learned position table shorter than prompt + decode: refused up front, naming the limit.
    folder = tmp_path / "gpt2"
    zoo.save(zoo.build("gpt2", preset="tiny", vocab_size=50257, max_positions=16, head_dim=16), folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(require_asset(f"gpt2-tokenizer/{name}"), folder / name)
    assert main(["check", "--model", str(folder), "--prompt", "one two three four", "--decode", "13"]) == 2
    assert "4 tokens) + --decode 13 = 17 positions, past this model's 16" in capsys.readouterr().err
