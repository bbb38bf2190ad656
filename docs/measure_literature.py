"""Measure what docs/caches.md reports for the caches from the literature: bytes held and decode
speed, against the dense cache, on stories260K (float32, heads of 8) and on the llama `small`
preset in float16 (heads of 64, random weights: bytes and speed do not depend on the weights).

    PYTHONPATH=. python docs/measure_literature.py [--data ../shared/data] [--context 1024]
        [--decode 32] [--out docs/literature.json] [--only stories260K] [--per-head-speed]

Each cache gets a random `context`-token prompt in chunks of 256, then `decode` single-token
steps. Reported per cache: bytes of every array it holds after the run (keys, values, and an
eviction cache's record and scores), the same for keys and values alone, the largest total seen
after any step (peak), the tokens it can attend to, the ratio to a dense cache of the model's
dtype holding the same tokens (2 x layers x kv heads x head size x itemsize per token), and the
median decode step (tokens/s, one mx.eval per step). Speeds are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import zoo  # first: it loads OpenBLAS for MLX, which works only before mlx.core (kvzoo/blas.py)
import mlx.core as mx
from mlx.utils import tree_flatten

import caches


def setups(head_dim: int) -> list[tuple[str, dict]]:
    group = 8 if head_dim < 32 else 64
    return [
        ("preallocated", {}),
        ("streaming", {"sinks": 4, "window": 252}),
        ("h2o", {"budget": 256, "recent": 32}),
        ("h2o", {"budget": 256, "recent": 32, "per_head": False}),
        ("snapkv", {"budget": 256, "window": 32}),
        ("snapkv", {"budget": 256, "window": 32, "per_head": False}),
        ("kivi", {"bits": 4, "group_size": 32, "residual": 128}),
        ("kivi", {"bits": 2, "group_size": 32, "residual": 128}),
        ("quantized", {"bits": 4, "group_size": group}),
    ]


def kv_bytes(layer) -> int:
    """Bytes of the keys and values alone (quantized forms included), without records."""
    total = 0
    for name in ("keys", "values", "key_q", "value_q", "key_full", "value_full"):
        a = getattr(layer, name, None)
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(x, mx.array):
                total += x.nbytes
    return total


def measure(model, name: str, options: dict, context: int, decode: int, seed: int = 0) -> dict:
    cfg = model.config
    tokens = mx.random.randint(0, cfg.vocab_size, (context + decode,), key=mx.random.key(seed)).astype(mx.int32)
    cache = caches.make(name, model, **options)
    for start in range(0, context, 256):
        mx.eval(model(tokens[None, start : min(context, start + 256)], cache))
    peak, steps = 0, []
    for i in range(decode):
        t0 = time.perf_counter()
        mx.eval(model(tokens[None, context + i : context + i + 1], cache))
        steps.append(time.perf_counter() - t0)
        peak = max(peak, sum(c.nbytes for c in cache))
    itemsize = tree_flatten(model.parameters())[0][1].dtype.size  # the model's dtype
    dense = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize * (context + decode)
    total = sum(c.nbytes for c in cache)
    return {
        "cache": name, "options": options, "tokens": context + decode,
        "held_tokens": min(c.size() for c in cache),
        "bytes": total, "kv_bytes": sum(kv_bytes(c) for c in cache), "peak_bytes": peak,
        "vs_dense": total / dense, "decode_tokens_per_s": 1 / statistics.median(steps),
    }


def per_head_speed(model, name: str, options: dict, context: int, decode: int, rounds: int = 4) -> dict:
    """CPU seconds per decode step of `name` with per_head=True and per_head=False, the two
    sides alternated round by round on the same prompt (fair under a shared machine's load)."""
    cfg = model.config
    tokens = mx.random.randint(0, cfg.vocab_size, (context + decode,), key=mx.random.key(1)).astype(mx.int32)
    spent = {True: 0.0, False: 0.0}
    for _ in range(rounds):
        for per_head in (True, False):
            cache = caches.make(name, model, **options, per_head=per_head)
            mx.eval(model(tokens[None, :context], cache))
            t0 = time.process_time()
            for i in range(decode):
                mx.eval(model(tokens[None, context + i : context + i + 1], cache))
            spent[per_head] += time.process_time() - t0
    steps = rounds * decode
    return {"cache": name, "options": options, "per_head_s": spent[True] / steps,
            "per_layer_s": spent[False] / steps, "ratio": spent[True] / spent[False]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=None, help="measure only the models whose label starts with this")
    parser.add_argument("--per-head-speed", action="store_true",
                        help="only: h2o and snapkv decode CPU time, per kv head against per layer, alternated")
    args = parser.parse_args()
    models = {
        "stories260K (fp32, head 8)": lambda: zoo.load_model(Path(args.data) / "stories260K" / "stories260K.gguf"),
        "llama small (fp16, head 64)": lambda: zoo.build("llama", preset="small", dtype=mx.float16, seed=0),
    }
    models = {label: load() for label, load in models.items() if args.only is None or label.startswith(args.only)}
    report = {}
    if args.per_head_speed:
        for label, model in models.items():
            for name, options in [("h2o", {"budget": 256, "recent": 32}), ("snapkv", {"budget": 256, "window": 32})]:
                r = per_head_speed(model, name, options, args.context, args.decode)
                print(f"{label} {name}: per kv head {1e3 * r['per_head_s']:.2f} ms CPU a step, per layer "
                      f"{1e3 * r['per_layer_s']:.2f} ms: ratio {r['ratio']:.3f}")
        return
    for label, model in models.items():
        rows = [measure(model, name, options, args.context, args.decode)
                for name, options in setups(model.config.head_dim)]
        report[label] = rows
        print(f"\n{label}: {args.context}-token prompt + {args.decode} decoded tokens")
        print("| cache | held tokens | bytes | keys+values | peak | vs dense | decode tok/s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            print(f"| {r['cache']}({opts}) | {r['held_tokens']} | {r['bytes']:,} | {r['kv_bytes']:,} | "
                  f"{r['peak_bytes']:,} | {r['vs_dense']:.3f} | {r['decode_tokens_per_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
