"""`kvzoo bench --vs-llamacpp`: the command lines it gives llama-bench, the file it hands over, and
the ratios it reports, checked with a stand-in llama-bench that validates both (the real one is
not installed in CI; docs/performance.md has the real run and its command)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from zoo.cli import main

FAKE = r'''#!{python}
"""A stand-in llama-bench: checks its arguments and the GGUF, logs them, prints llama-bench JSON."""
import json, sys
import gguf
args = sys.argv[1:]
opt = {{args[i]: args[i + 1] for i in range(0, len(args), 2)}}
reader = gguf.GGUFReader(opt["-m"])
assert reader.fields["general.architecture"].contents() == "llama"
assert opt["-o"] == "json" and opt["-r"] == "1"
prefill = opt["-n"] == "0"
assert prefill != (opt["-p"] == "0"), "one test per call: prefill or decode"
assert prefill or int(opt["-d"]) > 0, "decode must run at the prompt's depth"
with open({log!r}, "a") as log:
    log.write(json.dumps(opt) + "\n")
rate = 1000.0 if prefill else 100.0
print(json.dumps([{{"n_prompt": int(opt["-p"]), "n_gen": int(opt["-n"]), "avg_ts": rate, "samples_ts": [rate]}}]))
'''


@pytest.fixture
def fake_llama_bench(tmp_path):
    log = tmp_path / "calls.jsonl"
    path = tmp_path / "llama-bench"
    path.write_text(FAKE.format(python=sys.executable, log=str(log)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path, log


def test_llama_bench_runs_on_the_written_gguf_and_ratios_are_reported(tmp_path, capsys, fake_llama_bench):
    binary, log = fake_llama_bench
    out = tmp_path / "out"
    assert main(["bench", "--vs-llamacpp", str(binary), "--quick", "--no-progress", "--file-types", "F32,Q8_0",
                 "--prompt", "16", "--tokens", "4", "--repeats", "1", "--threads", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "against llama.cpp" in text and "llama-tiny-Q8_0.gguf" in text
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 4  # 2 files x (prefill, decode), one round
    assert {c["-t"] for c in calls} == {"2"}
    decode = [c for c in calls if c["-n"] != "0"]
    assert [(c["-p"], c["-n"], c["-d"]) for c in decode] == [("0", "4", "16")] * 2
    rows = json.loads((out / "bench_llamacpp.json").read_text())["llamacpp"]["rows"]
    assert [os.path.basename(r["file"]) for r in rows] == ["llama-tiny-F32.gguf", "llama-tiny-Q8_0.gguf"]
    for row in rows:
        assert row["prefill"]["llama.cpp"] == 1000.0 and row["decode"]["llama.cpp"] == 100.0
        for side in ("kvzoo", "mlx-lm"):
            assert row["decode_ratio"][side] == pytest.approx(row["decode"][side] / 100.0)
            assert row["prefill_ratio"][side] == pytest.approx(row["prefill"][side] / 1000.0)
            assert row["decode"][side] > 0
        assert row["kvzoo_dtype"] == "mlx.core.float32"


def test_missing_binary_and_stray_options_are_refused_with_the_reason(tmp_path, capsys):
    assert main(["bench", "--vs-llamacpp", str(tmp_path / "nope"), "--quick", "--no-progress"]) == 2
    assert "no executable" in capsys.readouterr().err
    assert main(["bench", "--quick", "--no-progress", "--tokens", "4"]) == 2
    assert "--tokens only apply with --vs-llamacpp" in capsys.readouterr().err
    assert main(["bench", "--vs-llamacpp", str(tmp_path / "nope"), "--file-types", "Q4_K"]) == 2
    assert "--file-types: unknown ['Q4_K']" in capsys.readouterr().err
