"""One process of tests/test_distributed.py, started by `mlx.launch --backend ring -n N`.

    python tests/helpers/distributed_worker.py OUT_DIR [PLUGIN.py ...]

Every process builds the same tiny random models (fixed seeds, random nonzero biases), and
for every scenario (family x positional scheme x head layout x registered cache x its
example options) runs the single-process model (rank 0 only: the oracle) and its own shard
(zoo.shard over the ring group) through the same cache: logits for a sequence fed in uneven
chunks, and greedy tokens from zoo.generate_step. Each rank writes what it saw to
OUT_DIR/rank<r>.npz and OUT_DIR/rank<r>.json; the test compares them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import caches
import zoo
from kvzoo import plugins

SEQUENCE = [3, 17, 42, 5, 88, 1, 64, 23, 9, 71, 30, 2, 55, 12, 90, 7]  # 16 tokens
CHUNKS = [6, 5, 1, 1, 1, 1, 1]  # a prefill longer than the smallest rotating window, then decode
PROMPT, DECODE = SEQUENCE[:6], 5

# (name, family, config overrides, which caches): both families with every registered cache
# ("every", each with its first example option set); then every positional scheme, kv heads
# split and copied (MQA) and a sliding window, with the caches whose key positions, stored
# values or kept keys differ from plain concatenation ("some"). A cache that refuses a model
# (caches.Unsupported: streaming on learned positions) must refuse it whole and split alike.
BIASES = dict(qkv_bias=True, out_bias=True, mlp_bias=True)
MODELS = [
    ("llama-rope-GQA", "llama", dict(**BIASES), "every"),
    ("gpt2-learned-MHA", "gpt2", {}, "every"),  # streaming refuses learned positions
    ("llama-alibi-MQA", "llama", dict(positional="alibi", n_kv_heads=1, **BIASES), "some"),
    ("gpt2-alibi-GQA", "gpt2", dict(positional="alibi", n_kv_heads=2), "some"),
    ("gpt2-rope-MQA", "gpt2", dict(positional="rope", n_kv_heads=1), "some"),
    ("llama-rope-MHA-window", "llama", dict(n_kv_heads=4, sliding_window=6, head_bias=True, **BIASES), "some"),
]


SOME = ("rotating", "quantized", "streaming", "h2o", "snapkv", "head-mass")


def scenarios(head_dim: int = 32) -> list[tuple[str, str, dict, str, dict]]:
    """(key, family, overrides, cache name, options) for every scenario, in run order."""
    out = []
    for label, family, overrides, which in MODELS:
        for cache_name in caches.available():
            examples = caches.examples(cache_name, head_dim=head_dim, seq_len=len(SEQUENCE))
            if which == "some" and cache_name not in SOME:
                continue
            for options in examples[:1]:
                key = f"{label}|{cache_name}|{json.dumps(options, sort_keys=True)}"
                out.append((key, family, overrides, cache_name, options))
    return out


def build(family: str, overrides: dict) -> zoo.CausalLM:
    """A tiny model with random weights and random (nonzero) biases, the same on every rank."""
    model = zoo.build(family, preset="tiny", seed=7, **overrides)
    key = mx.random.key(11)
    biases = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("bias"):
            key, sub = mx.random.split(key)
            biases.append((name, 0.1 * mx.random.normal(value.shape, key=sub)))
    model.update(tree_unflatten(biases))
    mx.eval(model.parameters())
    return model


def run(model, cache_name: str, options: dict) -> tuple[np.ndarray, list[int], int]:
    """(logits [16, V] fed in CHUNKS, greedy tokens, cache bytes after the logits)."""
    cache = caches.make(cache_name, model, **options)
    outputs, start = [], 0
    for size in CHUNKS:
        piece = mx.array([SEQUENCE[start : start + size]], dtype=mx.int32)
        outputs.append(model(piece, cache)[0])
        start += size
    logits = mx.concatenate(outputs, axis=0)
    mx.eval(logits)
    nbytes = sum(c.nbytes for c in cache)
    tokens = [t for t, _ in zoo.generate_step(model, PROMPT, cache=cache_name, cache_options=options,
                                               max_tokens=DECODE, prefill_step=4)]
    return np.array(logits), tokens, nbytes


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        plugins.load(spec)
    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    arrays, report = {}, {"size": group.size(), "scenarios": []}
    started = time.perf_counter()
    models: dict = {}
    for key, family, overrides, cache_name, options in scenarios():
        label = key.split("|")[0]
        if label not in models:  # build each model once: the single-process one on rank 0 only
            models = {label: (build(family, overrides) if rank == 0 else None,
                              zoo.shard(build(family, overrides), group))}
        full, shard = models[label]
        entry = dict(key=key, kv_heads=shard.distributed.n_kv_heads, n_kv_heads=shard.config.n_kv_heads)
        try:
            logits, tokens, nbytes = run(shard, cache_name, options)
            entry.update(tokens=tokens, cache_bytes=nbytes)
            arrays[key + "|dist"] = logits
        except caches.Unsupported as refusal:
            entry["refused"] = str(refusal)
        if full is not None:
            try:
                full_logits, full_tokens, full_bytes = run(full, cache_name, options)
                arrays[key + "|full"] = full_logits
                entry.update(full_tokens=full_tokens, full_cache_bytes=full_bytes)
            except caches.Unsupported as refusal:
                entry["full_refused"] = str(refusal)
        report["scenarios"].append(entry)
    report["seeds"] = [zoo.distributed.shared_seed(group) for _ in range(3)]  # what the CLI samplers get
    report["seconds"] = time.perf_counter() - started
    report["weight_bytes"] = zoo.distributed.weight_bytes(shard)
    np.savez(out / f"rank{rank}.npz", **arrays)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
