"""`kvzoo check`, the main job."""

from __future__ import annotations

import shutil
import subprocess
import sys

import caches
import positional
import zoo
from test_extending import ForgetfulCache, registered  # noqa: F401  (fixture)
from zoo.cli import main


def test_check_runs_every_pairing_and_passes(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith(" ok") or "FAIL" in line]
    n_options = sum(len(caches.get(n).conformance_examples(head_dim=32, seq_len=36))
                    for n in caches.available())
    assert len(rows) == len(zoo.available()) * len(positional.available()) * 3 * n_options
    assert "FAIL" not in out
    for name in caches.available():
        assert name in out


def test_check_selects_and_fails_loudly(capsys, registered):  # noqa: F811
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
