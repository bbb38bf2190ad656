"""Where a batched decode step goes, and what that allows: the small Llama at batch 1 and 16.

One process, the parts timed alternately (ratios hold on a loaded machine; absolute times do
not). For each batch size B it fills kvzoo's preallocated cache and mlx-lm's BatchKVCache with
the same random keys and values for ragged rows (lengths drawn 64-512 as in `kvzoo bench
--batch`; no prefill is run, so this takes a minute, and the tokens are meaningless: only
time is measured), then times:

- step:      one greedy decode step, kvzoo (`model(tokens, cache)` + argmax) and mlx-lm (the
             twin on its BatchKVCache), the same weights;
- products:  the step's weight products alone (x [B, K] @ W^T for every projection of every
             layer, then the head), on the model's own weights: GFLOP/s and weight GB/s;
- attention: the step's attention alone (every layer's one query per row over its cache
             rows, kvzoo's fold and shared mask);
- exp-bound: the element-wise work whose cost grows with B: the log-softmax of the logits
             [B, V] and the MLP's silu.

and prints the ceiling the products set: B / (products seconds) tokens/s, against 8x batch 1.

    PYTHONPATH=. python docs/measure_batch_ceiling.py --batches 1,16 --repeats 5
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python docs/measure_batch_ceiling.py --cpu   # under load
"""

from __future__ import annotations

import argparse
import os
import random
import time

import zoo  # first: MLX binds OpenBLAS and kvzoo's gemv shim (kvzoo/blas.py)
import mlx.core as mx
import mlx.nn as nn

import caches
from caches.attention import fast_sdpa
from zoo import fingerprint
from zoo.checkpoints.mlx_lm import to_mlx_lm


def filled(model, twin, padding: list[int], width: int, seed: int):
    """kvzoo and mlx-lm caches holding the same random keys/values [B, Hkv, width, D]."""
    from mlx_lm.models.cache import BatchKVCache

    cfg = model.config
    B = len(padding)
    ours = caches.make("preallocated", model)
    theirs = [BatchKVCache(padding) for _ in twin.layers]
    key = mx.random.key(seed)
    for mine, other in zip(ours, theirs):
        key, k1, k2 = mx.random.split(key, 3)
        k = mx.random.normal((B, cfg.n_kv_heads, width, cfg.head_dim), key=k1) * 0.5
        v = mx.random.normal((B, cfg.n_kv_heads, width, cfg.head_dim), key=k2) * 0.5
        mine.prepare_rows(padding)
        mine.update_and_fetch(k, v)
        other.update_and_fetch(k, v)
    fingerprint.stamp(ours, model)
    mx.eval([c.state for c in ours], [c.keys for c in theirs])
    return ours, theirs


def clock() -> float:
    """Wall seconds, or with --cpu this process's CPU seconds (all its threads): on a machine
    that others load, CPU time counts the work done, not the time waited for a core. Meant with
    OPENBLAS_NUM_THREADS=1 (an idle BLAS thread spinning would count as work)."""
    return time.process_time() if CPU else time.perf_counter()


CPU = False


def best(f, repeats: int, inner: int = 3) -> float:
    """Best seconds of `f()` over repeats (each the mean of `inner` evaluated calls)."""
    times = []
    for _ in range(repeats):
        start = clock()
        for _ in range(inner):
            mx.eval(f())
        times.append((clock() - start) / inner)
    return min(times)


def products(model, B: int):
    """A function running every weight product of one decode step at B rows; its FLOPs, bytes."""
    weights = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = model.lm_head.weight if hasattr(model, "lm_head") and not model.config.tie_embeddings else None
    if head is None:  # tied: the head is the embedding table
        head = next(m.weight for _, m in model.named_modules() if isinstance(m, nn.Embedding))
    weights = [w for w in weights if w is not head] + [head]
    xs = {w.shape[1]: mx.random.normal((B, w.shape[1])) for w in weights}
    mx.eval(list(xs.values()))
    flops = sum(2 * B * w.shape[0] * w.shape[1] for w in weights)
    nbytes = sum(w.nbytes for w in weights)

    def run():
        return [xs[w.shape[1]] @ w.T for w in weights]

    return run, flops, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--cpu", action="store_true", help="time in CPU seconds (see clock())")
    args = parser.parse_args()
    global CPU
    CPU = args.cpu
    model = zoo.build("llama", preset=args.preset, seed=0)
    twin = to_mlx_lm(model)
    cfg = model.config
    rng = random.Random(0)
    load = os.getloadavg()[0]
    results = {}
    for B in [int(b) for b in args.batches.split(",")]:
        lengths = [rng.randint(64, 512) for _ in range(B)]
        width = max(lengths)
        padding = [width - n for n in lengths]
        ours, theirs = filled(model, twin, padding, width, seed=B)
        token = mx.array([[1]] * B, dtype=mx.int32)

        def kvzoo_step():
            out = mx.argmax(model(token, ours, check_tokens=False)[:, -1, :], axis=-1)
            mx.eval(out)
            for c in ours:
                c.trim(1)
            return out

        def mlx_lm_step():
            out = mx.argmax(twin(token, cache=theirs)[:, -1, :], axis=-1)
            mx.eval(out)
            for c in theirs:
                c.trim(1)
            return out

        run_products, flops, nbytes = products(model, B)
        S = width + 1
        q = mx.random.normal((B, cfg.n_heads, 1, cfg.head_dim))
        k = ours[0].keys[..., :S, :]
        v = ours[0].values[..., :S, :]
        visible = (mx.arange(S)[None, :] >= mx.array(padding)[:, None])[:, None, None]  # [B, 1, 1, S]
        scale = cfg.head_dim ** -0.5

        def attention():
            return [fast_sdpa(q, k, v, scale=scale, mask=visible) for _ in range(cfg.n_layers)]

        logits = mx.random.normal((B, cfg.vocab_size))
        gate = mx.random.normal((B, cfg.d_ff))
        mx.eval(q, visible, logits, gate)

        def exp_bound():
            return [logits - mx.logsumexp(logits, axis=-1, keepdims=True)] + [
                nn.silu(gate) for _ in range(cfg.n_layers)]

        parts = {"kvzoo step": kvzoo_step, "mlx-lm step": mlx_lm_step, "products": run_products,
                 "attention": attention, "exp-bound": exp_bound}
        times = {name: float("inf") for name in parts}
        for _ in range(args.repeats):  # alternate the parts, keep each one's best
            for name, f in parts.items():
                times[name] = min(times[name], best(f, 1))
        results[B] = times
        print(f"B={B:>2} (rows of {min(lengths)}-{max(lengths)} tokens, {100 * sum(padding) / (B * width):.0f}% padding)")
        for name, t in times.items():
            extra = ""
            if name == "products":
                extra = f"  {flops / t / 1e9:6.1f} GFLOP/s, weights read at {nbytes / t / 1e9:5.1f} GB/s"
            if name == "attention":
                extra = f"  KV read at {2 * B * cfg.n_kv_heads * S * cfg.head_dim * 4 * cfg.n_layers / t / 1e9:5.1f} GB/s"
            share = t / times["kvzoo step"]
            print(f"  {name:12} {t * 1e3:8.1f} ms  {B / t:7.1f} tok/s  {100 * share:5.0f}% of kvzoo's step{extra}")
        print(f"  kvzoo / mlx-lm step speed: {times['mlx-lm step'] / times['kvzoo step']:.2f}x", flush=True)
    if 1 in results and len(results) > 1:
        one = results[1]["kvzoo step"]
        for B, times in results.items():
            if B == 1:
                continue
            print(f"B={B}: step {B * one / times['kvzoo step']:.2f}x batch 1's aggregate (target 8x); the "
                  f"products alone allow {B * one / times['products']:.2f}x, products + attention "
                  f"{B * one / (times['products'] + times['attention']):.2f}x")
    print(f"{'CPU' if CPU else 'wall'} seconds; load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
