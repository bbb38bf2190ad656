"""RoPE on the CPU: the per-forward rotation table (positional/rope.py) against mx.fast.rope's
CPU fallback, on stories260K decode and on a 100M-model 512-token prefill, alternating in one
process (medians; wall and CPU milliseconds), plus the graph size of one decode step.

    python docs/measure_rope_cpu.py [--rounds 6] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import statistics
import time
from pathlib import Path

import zoo  # first: kvzoo's BLAS setup before MLX
import caches
import mlx.core as mx
import positional.rope as rope
from zoo.generate import generate_step

TABLE = rope.RoPE.rotate


def fast_rope(self, queries, keys, positions):  # what RoPE.rotate did before: mx.fast.rope
    offset = positions[..., 0]
    return self._apply(queries, offset), self._apply(keys, offset)


def use(mode: str) -> None:
    rope.RoPE.rotate = TABLE if mode == "table" else fast_rope


def decode_ms(model, n: int) -> tuple[float, float]:
    steps = generate_step(model, list(range(3, 131)), max_tokens=n + 1)
    next(steps)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in steps:
        pass
    return (time.perf_counter() - wall) / n * 1e3, (time.process_time() - cpu) / n * 1e3


def prefill_ms(model, tokens: mx.array) -> tuple[float, float]:
    cache = caches.make("preallocated", model)
    wall, cpu = time.perf_counter(), time.process_time()
    mx.eval(model(tokens, cache)[:, -1])
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def graph_nodes(model) -> int:
    from caches import EXACT
    from zoo.layers import Context
    from zoo.runtime.compiled import _Slot

    cfg = model.config
    slots = [_Slot(mx.zeros((1, cfg.n_kv_heads, 256, cfg.head_dim)), mx.zeros((1, cfg.n_kv_heads, 256, cfg.head_dim)),
                   mx.array([5], dtype=mx.int32)) for _ in model.layers]
    ctx = Context(mx.array([5], dtype=mx.int32), model.positional, EXACT, window=None)
    logits = model.forward(mx.array([[3]]), ctx, slots)
    out = io.StringIO()
    mx.export_to_dot(out, logits, *[a for s in slots for a in (s.keys, s.values)])
    return sum(collections.Counter(re.findall(r'label ="?([A-Za-z]+)', out.getvalue())).values())


def alternate(label: str, fn, rounds: int) -> None:
    runs = {"table": [], "fast": []}
    for mode in runs:  # warm-up
        use(mode)
        fn()
    for _ in range(rounds):
        for mode in runs:
            use(mode)
            runs[mode].append(fn())
            mx.clear_cache()
    for mode, values in runs.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{label:34} {mode:6} wall {wall:8.3f} ms  cpu {cpu:8.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    stories = zoo.load_model(args.data / "stories260K" / "stories260K.gguf")
    for mode in ("fast", "table"):
        use(mode)
        print(f"stories260K decode-step graph nodes ({mode}): {graph_nodes(stories)}")
    alternate("stories260K decode, per token", lambda: decode_ms(stories, 200), args.rounds)
    small = zoo.build("llama", preset="small")
    tokens = mx.random.randint(0, small.config.vocab_size, (1, 512), key=mx.random.key(0))
    alternate("llama small 100M prefill 512", lambda: prefill_ms(small, tokens), max(2, args.rounds // 2))
    use("table")


if __name__ == "__main__":
    main()
