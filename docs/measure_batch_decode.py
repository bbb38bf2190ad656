"""Batched decode step speed, kvzoo against mlx-lm, with the prefill paid once.

`kvzoo bench --batch` times each library's whole batched generation loop, prefill included in
every run; on a loaded 2-core machine the prefills (16 prompts of 64-512 tokens) take most of
the time and the runs are few. This script prefills each batch once per library, then times
`--steps` greedy decode steps again and again, trimming them off the caches in between
(kvzoo's preallocated cache and mlx-lm's BatchKVCache both trim), alternating the libraries:
best and median aggregate tokens/s per batch size. Same weights (to_mlx_lm), same left-padded
prompts (lengths drawn from 64-512), same greedy tokens (checked).

    PYTHONPATH=. python docs/measure_batch_decode.py --batches 1,4,8,16 --steps 16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import zoo  # first: it loads OpenBLAS for MLX, which works only before mlx.core (kvzoo/blas.py)
import mlx.core as mx

import caches
from zoo.checkpoints.mlx_lm import to_mlx_lm


def padded(prompts: list[list[int]]) -> tuple[mx.array, list[int]]:
    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    return mx.array([[0] * pad + p for pad, p in zip(padding, prompts)], dtype=mx.int32), padding


def prefill(forward, tokens: mx.array, state) -> mx.array:
    start, width = 0, tokens.shape[1]
    while width - start > 1:
        n = min(512, width - 1 - start)
        forward(tokens[:, start : start + n])
        mx.eval(state())
        start += n
    return tokens[:, -1]


def decode(forward, token: mx.array, steps: int) -> tuple[float, list[list[int]]]:
    out = []
    start = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(forward(token[:, None])[:, -1, :], axis=-1).astype(mx.int32)
        mx.async_eval(token)
        out.append(token)
    mx.eval(out)
    return time.perf_counter() - start, mx.stack(out, axis=1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from mlx_lm.models.cache import BatchKVCache

    model = zoo.build("llama", preset=args.preset, seed=0)
    twin = to_mlx_lm(model)
    rng = random.Random(0)
    rows, load = [], os.getloadavg()[0]
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(64, 512))] for _ in range(b)]
        tokens, padding = padded(prompts)
        ours = caches.make("preallocated", model)
        for c in ours:
            c.prepare_rows(padding)
        theirs = [BatchKVCache(padding) for _ in twin.layers]

        def kvzoo_forward(t, ours=ours):
            return model(t, ours, check_tokens=False)

        def mlx_lm_forward(t, theirs=theirs):
            return twin(t, cache=theirs)

        first_k = prefill(kvzoo_forward, tokens, lambda: [c.state for c in ours])
        first_m = prefill(mlx_lm_forward, tokens, lambda: [c.state for c in theirs])
        times = {"kvzoo": [], "mlx-lm": []}
        same = None
        for r in range(args.repeats + 1):  # the first round warms up
            tk, out_k = decode(kvzoo_forward, first_k, args.steps)
            for c in ours:
                c.trim(args.steps)
            tm, out_m = decode(mlx_lm_forward, first_m, args.steps)
            for c in theirs:
                c.trim(args.steps)
            if r:
                times["kvzoo"].append(tk)
                times["mlx-lm"].append(tm)
            same = sum(a == m for a, m in zip(out_k, out_m))
        n = b * args.steps
        row = {"batch": b, "lengths": [len(p) for p in prompts], "same_rows": same,
               "seconds": times, "padding_share": sum(padding) / (b * tokens.shape[1])}
        for side in times:
            row[f"{side}_best"] = n / min(times[side])
            row[f"{side}_median"] = n / statistics.median(times[side])
        rows.append(row)
        print(f"B={b:>2}  kvzoo best {row['kvzoo_best']:7.1f} median {row['kvzoo_median']:7.1f} tok/s   "
              f"mlx-lm best {row['mlx-lm_best']:7.1f} median {row['mlx-lm_median']:7.1f}   "
              f"ratio best {row['kvzoo_best'] / row['mlx-lm_best']:.2f} median "
              f"{row['kvzoo_median'] / row['mlx-lm_median']:.2f}   same rows {same}/{b}", flush=True)
    single = rows[0]
    for row in rows:
        row["kvzoo_best_over_batch_1"] = row["kvzoo_best"] / single["kvzoo_best"]
        row["mlx_lm_best_over_batch_1"] = row["mlx-lm_best"] / single["mlx-lm_best"]
        print(f"B={row['batch']:>2}: x batch 1 (best) kvzoo {row['kvzoo_best_over_batch_1']:.2f}, "
              f"mlx-lm {row['mlx_lm_best_over_batch_1']:.2f}")
    print(f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "steps": args.steps, "repeats": args.repeats, "rows": rows,
                       "loadavg": [load, os.getloadavg()[0]]}, f, indent=2)


if __name__ == "__main__":
    main()
