"""`kvzoo bench --batch` in its smoke mode: every cache that serves ragged rows is timed, the
ones mlx-lm can batch side by side with mlx-lm's BatchGenerator, whose greedy tokens for every
row must be kvzoo's (mlx-lm on the same weights is the oracle here)."""

from __future__ import annotations

import json

import caches
from zoo.cli import main


def test_batch_section_times_every_ragged_cache_and_matches_mlx_lm_tokens(tmp_path, capsys):
    assert main(["bench", "--batch", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "batched decoding, ragged prompts" in out
    rows = json.loads((tmp_path / "bench_batch.json").read_text())["batch"]["rows"]
    ragged = [n for n in caches.available() if caches.ragged_refusal(caches.get(n)) is None]
    assert {r["cache"] for r in rows} == set(ragged)
    compared = [r for r in rows if r["mlx_lm"]]
    assert {r["cache"] for r in compared} == {"preallocated", "rotating"}
    for r in compared:
        assert r["rows_identical"] == r["batch"], f"{r['cache']} B={r['batch']}: rows differ from mlx-lm"
        assert r["kvzoo_tokens_per_s"] > 0 and r["mlx_lm_tokens_per_s"] > 0
    for r in rows:
        assert r["cache_bytes"] > 0 and r["cache_bytes_per_row"] * r["batch"] == r["cache_bytes"]
        assert 0 <= r["padding_share"] < 1


def test_batch_section_refuses_unknown_caches(capsys):
    assert main(["bench", "--batch", "--smoke", "--no-progress", "--caches", "ring"]) == 2
    assert "unknown cache(s) ['ring']" in capsys.readouterr().err
