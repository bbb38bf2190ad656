"""`kvzoo bench` runs end to end and writes the report it promises. Never a timed assertion:
speeds are only checked to be measured (positive, finite), not to be fast."""

from __future__ import annotations

import json
import math

import pytest

import caches
from helpers.assets import require_module
from zoo.cli import bench
from zoo.cli import main as cli


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    assert cli(["bench", "--smoke", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    report["_out"] = out
    return report


def expected_caches() -> list[str]:
    return caches.available() + [bench.NO_CACHE]


def with_twin(name: str) -> bool:
    return name == bench.NO_CACHE or name in {c.cache for c in bench.COUNTERPARTS}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_registered_cache_is_timed_on_both_sides(report):
    assert set(report["configs"]) == {"gpt2", "llama"}
    for config in report["configs"].values():
        rows = {row["cache"]: row for row in config["results"]}
        refused = {row["cache"]: row["reason"] for row in config["skipped"]}
        assert list(rows) == [name for name in expected_caches() if name not in refused]
        # only what a cache refuses by design, with the reason (streaming on learned positions)
        assert all(name == "streaming" and "absolute positions" in reason for name, reason in refused.items())
        for name, row in rows.items():
            for phase in ("prefill", "decode"):
                speeds = row[phase]["tokens_per_s"]
                assert positive(speeds["kvzoo"])
                if with_twin(name):
                    assert positive(speeds["mlx_lm"])
                    assert row[phase]["ratio"] == pytest.approx(speeds["kvzoo"] / speeds["mlx_lm"])
                else:
                    assert speeds["mlx_lm"] is None and row[phase]["ratio"] is None and row["mlx_lm"] == "-"
            assert positive(row["decode"]["fraction_of_limit"]["kvzoo"])
        assert rows["preallocated"]["mlx_lm"] == "KVCache"
        assert positive(config["limit_tokens_per_s"]) and positive(config["weight_bytes_per_token"])


def test_the_sweep_covers_every_cache_and_context(report):
    contexts = report["settings"]["contexts"]
    for config in report["configs"].values():
        points = {(p["cache"], p["context"]): p for p in config["sweep"]}
        refused = {row["cache"] for row in config["skipped"]}  # by design, with the reason (above)
        for name in (n for n in expected_caches() if n not in refused):
            for context in contexts:
                point = points[(name, context)]
                assert positive(point["tokens_per_s"]["kvzoo"])
                assert positive(point["tokens_per_s"]["mlx_lm"]) == with_twin(name)
        for context in contexts:  # exact caches hold what mlx-lm's hold, byte for byte
            for name in ("concat", "preallocated"):
                nbytes = points[(name, context)]["nbytes"]
                assert nbytes["kvzoo"] == nbytes["mlx_lm"] > 0


def test_the_report_names_the_machine_and_blas(report):
    blas = report["machine"]["blas"]
    assert {"fast", "library", "how", "bound", "mlx_sgemm_gflops"} <= set(blas)
    assert positive(report["bandwidth"]["bandwidth_gbs"])
    assert report["settings"]["dtype"] == "float32"
    require_module("matplotlib")  # the test extra installs it; under CI its absence fails
    assert (report["_out"] / "bench.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--configs", "gpt3"], "unknown config"),
    (["--caches", "nope"], "unknown cache"),
    (["--repeats", "0"], "--repeats"),
    (["--dtype", "int8"], "unknown dtype"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    assert cli(["bench", "--smoke", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_plugin_cache_is_timed_on_the_kvzoo_side_with_a_dash_for_mlx_lm(capsys, tmp_path):
    from helpers.assets import ROOT
    from helpers.user_caches import forget_plugin

    plugin = str(ROOT / "docs" / "examples" / "half_cache.py")
    forget_plugin("half", "half_cache")
    assert cli(["bench", "--smoke", "--no-progress", "--plugin", plugin, "--caches", "half,concat",
                "--configs", "llama", "--out", str(tmp_path)]) == 0
    forget_plugin("half", "half_cache")
    out = capsys.readouterr().out
    half = next(line for line in out.splitlines() if line.startswith("half "))
    assert half.split()[1] == "-" and half.count(" - ") >= 2
    rows = {r["cache"]: r for r in json.loads((tmp_path / "bench.json").read_text())["configs"]["llama"]["results"]}
    assert rows["half"]["decode"]["ratio"] is None and positive(rows["half"]["decode"]["tokens_per_s"]["kvzoo"])
    assert rows["half"]["nbytes_per_token"] == pytest.approx(rows["concat"]["nbytes_per_token"] / 2)
