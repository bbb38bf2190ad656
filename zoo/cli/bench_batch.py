"""`kvzoo bench --batch`: batched decoding of ragged prompts, kvzoo against mlx-lm's BatchGenerator.

For batch sizes 1, 4, 8, 16 (quick: 1, 4, 8) it draws prompt lengths uniformly from 64-512
(quick: 16-128), random tokens, and times greedy decoding of every row through
`zoo.batch.BatchDecoder` and through mlx-lm's `BatchGenerator` (mlx_lm.generate) on the same
weights (`zoo.checkpoints.mlx_lm.to_mlx_lm`), alternating the two, median of the runs:

- aggregate decode tokens/s: tokens of every row after each row's first one, over the time
  from the first step's tokens to the last step's (prefill excluded on both sides), from the
  median run and from the best run (on a loaded machine the best run is the one least
  disturbed by others' work; every run's seconds are in the JSON);
- the speed-up of each batch size over batch 1, and kvzoo / mlx-lm;
- kvzoo's cache bytes after prefill, in total and per row, and the share of slots that are
  left padding;
- whether each row's greedy tokens are the same from both libraries.

Caches mlx-lm can batch: preallocated (mlx-lm's KVCache -> BatchKVCache) and rotating without
sinks (RotatingKVCache(keep=0) -> BatchRotatingKVCache; mlx-lm's batched rotating cache has no
sinks). Every other registered cache (concat, quantized, rotating with keep > 0, plugins that
declare ragged rows) is timed on the kvzoo side only.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable, Optional

import mlx.core as mx

import caches
from sampling import greedy_sample

from ..batch import BatchDecoder
from ..registry import build
from ..runtime.device import parse_dtype


def _mlx_lm_caches(kind: str, window: int) -> Callable[[Any], list]:
    from mlx_lm.models import cache as lm_cache

    if kind == "preallocated":
        return lambda twin: [lm_cache.KVCache() for _ in twin.layers]
    return lambda twin: [lm_cache.RotatingKVCache(max_size=window, keep=0) for _ in twin.layers]


def entries(head_dim: int, window: int, longest: int,
            selected: Optional[list[str]] = None) -> list[tuple[str, dict, Optional[str]]]:
    """(cache, options, mlx-lm counterpart or None) for every registered cache that serves
    ragged rows: its mlx-lm twin's options where it has one, else its first declared options."""
    out: list[tuple[str, dict, Optional[str]]] = []
    for name in caches.available():
        if selected is not None and name not in selected:
            continue
        if caches.ragged_refusal(caches.get(name)):
            continue
        if name == "preallocated":
            out.append((name, {}, "preallocated"))
        elif name == "rotating":
            out.append((name, {"max_size": window, "keep": 0}, "rotating"))
            out.append((name, {"max_size": window, "keep": 4}, None))  # sinks: mlx-lm cannot batch them
        elif name == "quantized":
            out.append((name, {"bits": 4, "group_size": 64 if head_dim % 64 == 0 else 32}, None))
        else:
            examples = caches.examples(name, head_dim=head_dim, seq_len=longest)
            if examples:
                out.append((name, examples[0], None))
    return out


def kvzoo_decode(model, prompts: list[list[int]], cache: str, options: dict, n: int) -> dict[str, Any]:
    """Greedy-decode n tokens per row; seconds after the first step, tokens, cache bytes."""
    decoder = BatchDecoder(model, prompts, cache=cache, cache_options=options, samplers=greedy_sample)
    tokens: list[list[int]] = [[] for _ in prompts]
    start = None
    nbytes = 0
    for row, token, _ in decoder.run(n):
        tokens[row].append(token)
        if start is None and row == len(prompts) - 1:  # the first step is out: prefill is over
            start = time.perf_counter()
            nbytes = decoder.cache_bytes()
    seconds = time.perf_counter() - start
    slots = len(prompts) * max(decoder.lengths)
    return dict(seconds=seconds, tokens=tokens, cache_bytes=nbytes, padding=sum(decoder.padding) / slots)


def mlx_lm_decode(twin, prompts: list[list[int]], make_caches: Callable[[Any], list], n: int) -> dict[str, Any]:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(twin, max_tokens=n, sampler=greedy_sample, completion_batch_size=len(prompts),
                         prefill_batch_size=len(prompts), prefill_step_size=512)
    uids = gen.insert(prompts, caches=[make_caches(twin) for _ in prompts])
    tokens = {uid: [] for uid in uids}
    start = None
    try:
        while responses := gen.next_generated():
            if start is None:
                start = time.perf_counter()
            for r in responses:
                tokens[r.uid].append(r.token)
        mx.synchronize()
    finally:
        gen.close()
    return dict(seconds=time.perf_counter() - start, tokens=[tokens[u] for u in uids])


def bench_batch(*, quick: bool, repeats: int, decode: int, batch_sizes: tuple[int, ...],
                lengths: tuple[int, int], dtype: str = "float32", seed: int = 0,
                selected: Optional[list[str]] = None, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The batch section of the report: one row per (cache, batch size)."""
    from ..checkpoints.mlx_lm import to_mlx_lm

    model = build("llama", preset="tiny" if quick else "small", seed=seed, dtype=parse_dtype(dtype),
                  **({"max_positions": 1024} if quick else {}))
    twin = to_mlx_lm(model)
    cfg = model.config
    window = 256 if not quick else 64
    rng = random.Random(seed)
    prompt_sets = {b: [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(*lengths))] for _ in range(b)]
                   for b in batch_sizes}
    rows = []
    for cache, options, counterpart in entries(cfg.head_dim, window, lengths[1] + decode, selected):
        for b in batch_sizes:
            prompts = prompt_sets[b]
            kvzoo_decode(model, [p[:8] for p in prompts[:2]], cache, options, 2)  # warm-up
            zs, ms, z, m = [], [], None, None
            for _ in range(repeats):
                z = kvzoo_decode(model, prompts, cache, options, decode)
                zs.append(z["seconds"])
                if counterpart is not None:
                    m = mlx_lm_decode(twin, prompts, _mlx_lm_caches(counterpart, window), decode)
                    ms.append(m["seconds"])
                mx.clear_cache()
                if progress:
                    progress(f"batch {cache} B={b}")
            tokens = b * (decode - 1)
            row = dict(cache=cache, options=options, batch=b, lengths=[len(p) for p in prompts],
                       kvzoo_tokens_per_s=tokens / statistics.median(zs), kvzoo_best=tokens / min(zs),
                       kvzoo_seconds=zs, mlx_lm_seconds=ms,
                       cache_bytes=z["cache_bytes"], cache_bytes_per_row=z["cache_bytes"] / b,
                       padding_share=z["padding"], mlx_lm=counterpart is not None)
            if m is not None:
                row["mlx_lm_tokens_per_s"] = tokens / statistics.median(ms)
                row["mlx_lm_best"] = tokens / min(ms)
                row["ratio"] = row["kvzoo_tokens_per_s"] / row["mlx_lm_tokens_per_s"]
                row["best_ratio"] = row["kvzoo_best"] / row["mlx_lm_best"]
                row["rows_identical"] = sum(a == c for a, c in zip(z["tokens"], m["tokens"]))
            rows.append(row)
    for row in rows:
        single = next((r for r in rows if r["cache"] == row["cache"] and r["options"] == row["options"]
                       and r["batch"] == 1), None)
        if single:
            row["speedup_over_batch_1"] = row["kvzoo_tokens_per_s"] / single["kvzoo_tokens_per_s"]
            row["best_speedup_over_batch_1"] = row["kvzoo_best"] / single["kvzoo_best"]
    return dict(model=f"llama {'tiny' if quick else 'small'} ({model.n_params / 1e6:.1f}M parameters)",
                decode=decode, repeats=repeats, prompt_lengths=list(lengths), window=window, rows=rows)


def run(*, quick: bool, smoke: bool = False, dtype: str = "float32", selected: Optional[list[str]] = None,
        repeats: Optional[int] = None, progress=None) -> dict[str, Any]:
    """smoke: every code path in seconds (the test suite); quick: the tiny preset; else the
    small Llama preset (~100M parameters) with prompts of 64-512 tokens."""
    if smoke:
        mode = dict(quick=True, repeats=1, decode=3, batch_sizes=(1, 3), lengths=(4, 12))
    elif quick:
        mode = dict(quick=True, repeats=2, decode=32, batch_sizes=(1, 4, 8, 16), lengths=(16, 128))
    else:
        mode = dict(quick=False, repeats=3, decode=32, batch_sizes=(1, 4, 8, 16), lengths=(64, 512))
    if selected is not None:
        unknown = sorted(set(selected) - set(caches.available()))
        if unknown:
            raise ValueError(f"unknown cache(s) {unknown}; registered: {', '.join(caches.available())}")
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {repeats}")
        mode["repeats"] = repeats
    return bench_batch(dtype=dtype, selected=selected, progress=progress, **mode)


def format_rows(section: dict[str, Any]) -> str:
    lines = [f"batched decoding, ragged prompts ({section['prompt_lengths'][0]}-{section['prompt_lengths'][1]} "
             f"tokens), {section['model']}, greedy, {section['decode']} tokens per row, aggregate decode tok/s "
             f"(median of {section['repeats']}):",
             f"{'cache':<34}{'B':>3}{'kvzoo':>9}{'mlx-lm':>9}{'ratio':>7}{'x B=1':>7}{'best ratio':>11}"
             f"{'best x B=1':>11}{'same rows':>10}{'cache MB':>10}{'MB/row':>8}{'padding':>8}"]
    for r in section["rows"]:
        options = ",".join(f"{k}={v}" for k, v in r["options"].items())
        name = f"{r['cache']}({options})" if options else r["cache"]
        mlx = f"{r['mlx_lm_tokens_per_s']:>9.1f}{r['ratio']:>7.2f}" if r["mlx_lm"] else f"{'-':>9}{'-':>7}"
        same = f"{r['rows_identical']}/{r['batch']}" if r["mlx_lm"] else "-"
        best = f"{r['best_ratio']:>11.2f}" if r["mlx_lm"] else f"{'-':>11}"
        lines.append(f"{name:<34}{r['batch']:>3}{r['kvzoo_tokens_per_s']:>9.1f}{mlx}"
                     f"{r.get('speedup_over_batch_1', float('nan')):>7.2f}{best}"
                     f"{r.get('best_speedup_over_batch_1', float('nan')):>11.2f}{same:>10}"
                     f"{r['cache_bytes'] / 1e6:>10.2f}{r['cache_bytes_per_row'] / 1e6:>8.2f}"
                     f"{100 * r['padding_share']:>7.0f}%")
    return "\n".join(lines)
