"""Tensor parallelism (zoo.shard, issue 17) against the single-process model.

Two kinds of test:

- one process, every rank's shard in turn (a stand-in group whose all-sum is the identity):
  each rank's attention and MLP output is a share, and the shares of all ranks sum to the
  unsharded block half, through every cache, prefill and decode alike; fast;
- two real processes (`mlx.launch --backend ring -n 2`, loopback, bounded in time): the
  distributed logits equal the single-process logits (fp32, 1e-4) and the greedy tokens are
  identical, for every registered cache (the built-ins and docs/examples' user caches) on
  both families, ALiBi, RoPE and learned positions, MHA, GQA and MQA (kv head copied), a
  sliding window; every process sees the same logits; each process's cache holds its heads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers.assets import ROOT, require_asset
from mlx.utils import tree_flatten, tree_unflatten

import caches
import zoo
from caches import EXACT
from zoo.distributed import HeadSlicedPositional, RowParallelLinear, plan
from zoo.layers import Context

TOLERANCE = 1e-4
# Plugins the two processes load: docs/examples' user caches, and a cache whose choice couples
# the heads of a layer (summed through Cache.across_heads).
EXAMPLE_CACHES = sorted(str(p) for p in (ROOT / "docs" / "examples").glob("*.py")) + [
    str(ROOT / "tests" / "helpers" / "head_mass_cache.py")]
# Eviction caches also keep per-key state shared by the heads (scores, records): per process.
PER_KEY_STATE = {"h2o", "snapkv", "head-mass"}
LAUNCH_TIMEOUT = 420  # seconds; the run takes ~10 s on 2 idle cores


class StandIn:
    """Rank `rank` of `size` processes simulated in one: all_sum returns this rank's share."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def all_sum(self, x: mx.array) -> mx.array:
        return x


def build(family: str, seed: int = 3, **overrides) -> zoo.CausalLM:
    """A tiny model with random weights and random nonzero biases (the same for a seed)."""
    model = zoo.build(family, preset="tiny", seed=seed, **overrides)
    key = mx.random.key(seed + 100)
    biases = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("bias"):
            key, sub = mx.random.split(key)
            biases.append((name, 0.1 * mx.random.normal(value.shape, key=sub)))
    model.update(tree_unflatten(biases))
    mx.eval(model.parameters())
    return model


def attention_of(block):
    return block.get("self_attn", block.get("attn"))


BIASES = dict(qkv_bias=True, out_bias=True, mlp_bias=True)
LAYOUTS = [  # (family, overrides, process count): split and copied kv heads, every scheme
    ("llama", dict(BIASES), 2),  # GQA 4/2, rope: kv heads split
    ("llama", dict(BIASES, n_kv_heads=4, positional="alibi"), 4),  # MHA, alibi, one head each
    ("llama", dict(BIASES, n_kv_heads=1, positional="alibi"), 2),  # MQA: the kv head copied
    ("llama", dict(BIASES, n_kv_heads=2), 4),  # GQA 4/2 over 4: each copies its one kv head
    ("gpt2", {}, 2),  # fused c_attn, learned positions
    ("gpt2", dict(n_kv_heads=2, positional="alibi"), 2),  # fused c_attn with GQA, alibi
    ("gpt2", dict(n_kv_heads=1, positional="rope"), 4),  # MQA over 4
    ("llama", dict(BIASES, sliding_window=3), 2),  # a model's window with the sharded bias hook
]


@pytest.mark.parametrize("family,overrides,size", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("cache_name", ["concat", "rotating", "quantized"])
def test_shares_of_every_rank_sum_to_the_unsharded_block(family, overrides, size, cache_name):
    full = build(family, **overrides)
    ranks = [zoo.shard(build(family, **overrides), StandIn(r, size)) for r in range(size)]
    options = caches.examples(cache_name, head_dim=full.config.head_dim, seq_len=9)[0]
    full_caches = caches.make(cache_name, full, **options)
    rank_caches = [caches.make(cache_name, m, **options) for m in ranks]
    key = mx.random.key(5)
    offset = 0
    for length in (5, 1, 2, 1):  # prefill, then decode through each rank's cache
        key, sub = mx.random.split(key)
        x = mx.random.normal((1, length, full.config.d_model), key=sub)
        positions = mx.arange(offset, offset + length, dtype=mx.int32)
        offset += length
        for layer in range(len(full.layers)):
            def halves(model, cache):
                ctx = Context(positions, model.positional, EXACT, window=model.config.sliding_window)
                block = model.layers[layer]
                return attention_of(block)(x, ctx, cache[layer]), block.mlp(x)

            want_attn, want_mlp = halves(full, full_caches)
            shares = [halves(m, c) for m, c in zip(ranks, rank_caches)]
            got_attn = sum(s[0] for s in shares)
            got_mlp = sum(s[1] for s in shares)
            assert mx.abs(got_attn - want_attn).max().item() < TOLERANCE
            assert mx.abs(got_mlp - want_mlp).max().item() < TOLERANCE
    # Each rank's cache holds its heads only: 1/size of the kv heads when they split.
    part = ranks[0].distributed
    full_bytes = sum(c.nbytes for c in full_caches)
    for cache in rank_caches:
        assert sum(c.nbytes for c in cache) * full.config.n_kv_heads == full_bytes * part.n_kv_heads


def test_a_cache_sums_across_heads_only_when_split():
    whole = caches.make("concat", build("llama"))
    x = mx.array([1.0, 2.0])
    assert whole[0].heads_group is None and mx.array_equal(whole[0].across_heads(x), x)

    class Doubling(StandIn):  # two ranks holding the same share
        def all_sum(self, x):
            return 2 * x

    split = caches.make("concat", zoo.shard(build("llama"), Doubling(0, 2)))
    assert all(isinstance(c.heads_group, Doubling) for c in split)
    assert mx.array_equal(split[0].across_heads(x), 2 * x)
    # eviction caches sum across processes in every layer (not the first only)
    if "h2o" in caches.available():
        evicting = caches.make("h2o", zoo.shard(build("llama"), Doubling(0, 2)), budget=5, recent=1)
        assert len(evicting) > 1 and all(isinstance(c.heads_group, Doubling) for c in evicting)


def test_each_rank_keeps_its_heads_and_units():
    cfg = zoo.make_config("llama", preset="tiny", n_heads=8, n_kv_heads=4, d_ff=96)
    assert [plan(cfg, r, 4).q_heads for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [plan(cfg, r, 4).kv_heads for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [plan(cfg, r, 4).hidden for r in range(4)] == [(0, 24), (24, 48), (48, 72), (72, 96)]
    assert not plan(cfg, 0, 4).kv_replicated
    # 8 processes over 4 kv heads: rank r's 1 query head reads kv head r // 2, a copy.
    assert [plan(cfg, r, 8).kv_heads for r in range(8)] == [(r // 2, r // 2 + 1) for r in range(8)]
    assert plan(cfg, 0, 8).kv_replicated


@pytest.mark.parametrize("overrides,size,words", [
    (dict(n_heads=4, n_kv_heads=2), 3, "cannot split 4 attention heads over 3 processes"),
    (dict(n_heads=6, n_kv_heads=3, head_dim=16, d_ff=96), 2, "cannot split 3 key/value heads over 2"),
    (dict(d_ff=130), 4, "cannot split the MLP's 130 hidden units over 4"),
])
def test_a_model_that_does_not_split_is_refused_unchanged(overrides, size, words):
    model = zoo.build("llama", preset="tiny", **overrides)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    with pytest.raises(ValueError, match=words):
        zoo.shard(model, StandIn(0, size))
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert model.layers[0].self_attn.n_heads == model.config.n_heads


def test_sharding_twice_is_refused_and_one_process_changes_nothing():
    model = zoo.shard(build("gpt2"), StandIn(0, 2))
    with pytest.raises(ValueError, match="already sharded"):
        zoo.shard(model, StandIn(0, 2))
    alone = build("gpt2")
    tokens = mx.array([[1, 2, 3]])
    want = alone(tokens)
    assert zoo.shard(alone, StandIn(0, 1)) is alone
    assert mx.array_equal(alone(tokens), want)


def test_alibi_slopes_follow_the_head_slice():
    model = zoo.shard(zoo.build("llama", preset="tiny", positional="alibi"), StandIn(1, 2))
    scheme = model.positional
    assert isinstance(scheme, HeadSlicedPositional) and (scheme.start, scheme.stop) == (2, 4)
    whole = zoo.build("llama", preset="tiny", positional="alibi").positional
    q, k = mx.arange(3, 5), mx.arange(5)
    assert mx.array_equal(scheme.bias(q, k), whole.bias(q, k)[2:4])  # heads 2, 3 of 4


def test_output_bias_lives_on_rank_zero_only():
    model = build("llama", **BIASES)
    bias = model.layers[0].self_attn.o_proj.bias
    ranks = [zoo.shard(build("llama", **BIASES), StandIn(r, 2)) for r in range(2)]
    projections = [m.layers[0].self_attn.o_proj for m in ranks]
    assert all(isinstance(p, RowParallelLinear) for p in projections)
    assert mx.array_equal(projections[0].bias, bias) and "bias" not in projections[1]


def free_port(count: int = 2) -> int:
    """A port p with p..p+count-1 free on loopback now (the ring backend listens there)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + count > 65535:
            continue
        try:
            sockets = []
            for p in range(port, port + count):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                sockets.append(s)
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free loopback ports for the ring backend")


def launch(args: list[str], timeout: float = LAUNCH_TIMEOUT, n: int = 2) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n N` on loopback (the venv's launcher, free ports)."""
    launcher = Path(sys.executable).with_name("mlx.launch")  # installed with mlx
    command = [str(launcher), "--backend", "ring", "-n", str(n), "--starting-port", str(free_port(n)), "--", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks: their own session
        stdout, stderr = process.communicate()
        pytest.fail(f"mlx.launch ran past {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What the two ranks of tests/helpers/distributed_worker.py saw (one launch for all)."""
    out = tmp_path_factory.mktemp("distributed")
    done = launch([sys.executable, "-m", "tests.helpers.distributed_worker", str(out), *EXAMPLE_CACHES])
    # mlx.launch exits 0 even when a rank fails: every rank must have written its report.
    missing = [r for r in range(2) if not (out / f"rank{r}.json").exists()]
    assert done.returncode == 0 and not missing, f"ranks {missing} failed:\n{done.stdout}\n{done.stderr}"
    ranks = []
    for r in range(2):
        report = json.loads((out / f"rank{r}.json").read_text())
        ranks.append((report, dict(np.load(out / f"rank{r}.npz"))))
    return ranks


def test_two_processes_cover_every_cache_on_both_families(two_processes):
    (report, _), _ = two_processes
    assert report["size"] == 2
    keys = [s["key"] for s in report["scenarios"]]
    registered = set(caches.available()) | {"half", "last-n", "list", "head-mass"}  # + the plugins
    assert {k.split("|")[1] for k in keys} == registered
    for label in ("llama-rope-GQA", "gpt2-learned-MHA"):
        assert {k.split("|")[1] for k in keys if k.startswith(label + "|")} == registered
    some = {"rotating", "quantized", "streaming", "h2o", "snapkv", "head-mass"} & registered
    for label in ("llama-alibi-MQA", "gpt2-alibi-GQA", "gpt2-rope-MQA", "llama-rope-MHA-window"):
        assert {k.split("|")[1] for k in keys if k.startswith(label + "|")} == some
    refused = [s["key"] for s in report["scenarios"] if "refused" in s]
    assert all(k.startswith("gpt2-learned-MHA|streaming|") for k in refused), refused  # learned positions
    ran = {s["key"].split("|")[1] for s in report["scenarios"] if "refused" not in s}
    assert ran == registered  # every cache ran distributed on some model


def test_a_cache_refuses_a_split_model_as_it_refuses_the_whole(two_processes):
    (report0, _), (report1, _) = two_processes
    for entry0, entry1 in zip(report0["scenarios"], report1["scenarios"]):
        assert ("refused" in entry0) == ("full_refused" in entry0) == ("refused" in entry1), entry0["key"]


def test_distributed_logits_and_tokens_equal_one_process(two_processes):
    (report0, arrays0), (report1, arrays1) = two_processes
    for entry0, entry1 in zip(report0["scenarios"], report1["scenarios"], strict=True):
        key = entry0["key"]
        assert entry1["key"] == key
        if "refused" in entry0:
            continue  # test_a_cache_refuses_a_split_model_as_it_refuses_the_whole
        full, dist = arrays0[key + "|full"], arrays0[key + "|dist"]
        assert np.abs(dist - full).max() < TOLERANCE, key
        assert np.array_equal(arrays1[key + "|dist"], dist), f"{key}: the ranks' logits differ"
        assert entry0["tokens"] == entry0["full_tokens"] == entry1["tokens"], key


def test_each_process_cache_holds_its_heads(two_processes):
    (report0, _), (report1, _) = two_processes
    for entry0, entry1 in zip(report0["scenarios"], report1["scenarios"]):
        if "refused" in entry0:
            continue
        copied = entry0["n_kv_heads"] < 2  # MQA: each process keeps the one kv head
        want = 1.0 if copied else 0.5
        for entry in (entry0, entry1):
            share = entry["cache_bytes"] / entry0["full_cache_bytes"]
            if entry0["key"].split("|")[1] in PER_KEY_STATE:
                assert want <= share < want + 0.05, entry0["key"]
            else:
                assert share == want, entry0["key"]


def test_every_process_gets_rank_zeros_seed(two_processes):
    """A sampler left unseeded by the user must still draw the same tokens on every rank."""
    (report0, _), (report1, _) = two_processes
    assert report0["seeds"] == report1["seeds"]
    assert len(set(report0["seeds"])) == 3  # fresh draws, not a constant


def test_generate_runs_distributed_unchanged():
    """`kvzoo generate` under mlx.launch prints once, the text a single process prints."""
    path = require_asset("stories260K/stories260K.gguf")
    model, tokenizer = zoo.load(path)
    story = "".join(r.text for r in zoo.stream_generate(model, tokenizer, "Once upon a time", max_tokens=24))
    assert len(set(story.split())) > 5  # a story, not one token repeated
    both = launch([sys.executable, "-m", "zoo.cli", "generate", "--model", str(path), "--prompt",
                   "Once upon a time", "--max-tokens", "24"], timeout=300)
    assert both.returncode == 0, both.stderr
    assert both.stdout == story + "\n"  # rank 0 only, and the single process's greedy story
    assert both.stderr.count("Generation:") == 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loading_a_shard_never_holds_the_whole_model(family, tmp_path):
    """zoo.load_model(folder, group=) slices while reading, block by block: its peak memory is
    one shard plus one unsliced block, and the shard equals zoo.shard of the loaded model."""
    overrides = dict(d_model=256, n_layers=4, n_heads=8, head_dim=32, d_ff=1024)
    if family == "llama":
        overrides.update(n_kv_heads=4, tie_embeddings=False)
    zoo.save(zoo.build(family, preset="tiny", **overrides), tmp_path)
    whole = zoo.load_model(tmp_path)
    whole_bytes = zoo.distributed.weight_bytes(whole)
    block_bytes = zoo.distributed.weight_bytes(whole.layers[0])
    want = zoo.shard(whole, StandIn(1, 2))
    del whole
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    got = zoo.load_model(tmp_path, group=StandIn(1, 2))
    peak = mx.get_peak_memory() - base
    shard_bytes = zoo.distributed.weight_bytes(got)
    assert shard_bytes < 0.6 * whole_bytes
    assert peak <= shard_bytes + 1.05 * block_bytes < whole_bytes, (peak, shard_bytes, block_bytes, whole_bytes)
    assert {k: v.shape for k, v in tree_flatten(got.parameters())} == {k: v.shape for k, v in tree_flatten(want.parameters())}
    assert all(mx.array_equal(a, b) for (_, a), (_, b) in zip(tree_flatten(got.parameters()), tree_flatten(want.parameters())))


def test_study_runs_distributed_unchanged(tmp_path):
    """`kvzoo study` under mlx.launch: the same perplexities and KLs as one process, each
    cache holding half the bytes (stories260K's 4 kv heads split), one table, one set of
    files (rank 1 writes into a temporary folder of its own)."""
    from zoo.cli import main

    args = ["study", "--model", str(require_asset("stories260K/stories260K.gguf")),
            "--text", str(require_asset("corpora/tinystories-valid-part1.txt")),
            "--caches", "concat,rotating:max_size=32:keep=4", "--quick", "--no-plots", "--no-needle",
            "--no-cost", "--max-tokens", "96"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    both = launch([sys.executable, "-m", "zoo.cli", *args, "--out", str(tmp_path / "two")], timeout=300)
    assert both.returncode == 0, both.stderr
    assert both.stdout.count("wrote ") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    one, two = (json.loads((tmp_path / d / "study.json").read_text())["models"][0] for d in ("one", "two"))
    assert two["baseline"]["ppl"] == pytest.approx(one["baseline"]["ppl"], rel=1e-5)
    for run_one, run_two in zip(one["runs"], two["runs"], strict=True):
        assert run_two["conformance"]["ok"] and run_two["cache"] == run_one["cache"]
        for key in ("ppl", "kl_mean", "kl_max", "top1_agreement"):
            assert run_two["quality"][key] == pytest.approx(run_one["quality"][key], rel=1e-4, abs=1e-5), key
        assert 2 * run_two["quality"]["peak_bytes"] == run_one["quality"]["peak_bytes"]
