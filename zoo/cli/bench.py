"""`kvzoo bench`: kvzoo against mlx-lm on the same weights, side by side in one run.

For each model config (GPT-2 124M; a Llama-style GQA model of similar size; tiny presets with
--quick) it builds one set of random weights, hands the same arrays to mlx-lm's own model class
(`zoo.checkpoints.mlx_lm.to_mlx_lm`), and for every kvzoo cache that has an mlx-lm counterpart
(`COUNTERPARTS`, only those registered) plus "none" (recompute the whole prefix every step):

- prefill: time to the first token of a P-token prompt (all but the last token through the
  cache, then the last one to logits; the same path both generation loops take), tokens/s;
- decode: N greedy tokens through each library's own generation loop (`zoo.generate_step` and
  `mlx_lm.generate.generate_step`, same sampler, same prompt), tokens/s;
- a context sweep: decode tokens/s and cache bytes at contexts 128..4096 (caches filled with
  random keys/values of the right shape: decode cost does not depend on their values).

Runs alternate kvzoo and mlx-lm after a warm-up and report medians; every timing ends with an
evaluation (MLX is lazy). Decode is also reported as a fraction of this machine's limit:
measured memory read bandwidth / weight bytes read per token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx

import caches
from sampling import greedy_sample


from ..registry import build
from ..runtime.compiled import enabled as compiled_enabled
from ..runtime.device import default_dtype, parse_dtype

HELP = "time kvzoo against mlx-lm on identical weights, every cache, prefill/decode/context sweep"


# -- what is compared -----------------------------------------------------------------------


@dataclass(frozen=True)
class Counterpart:
    """A kvzoo cache (name + options for a model config) and its mlx-lm twin (one per layer)."""

    cache: str
    options: Callable[[Any, "Settings"], dict]
    mlx_lm: Callable[[Any, "Settings"], Any]
    mlx_lm_name: str


def _mlx_lm_cache(name: str) -> Callable[..., Any]:
    from mlx_lm.models import cache as lm_cache

    return getattr(lm_cache, name)


def _group_size(cfg) -> int:
    return 64 if cfg.head_dim % 64 == 0 else 32


COUNTERPARTS: list[Counterpart] = [
    Counterpart("concat", lambda cfg, s: {},
                lambda cfg, s: _mlx_lm_cache("ConcatenateKVCache")(), "ConcatenateKVCache"),
    Counterpart("preallocated", lambda cfg, s: {},
                lambda cfg, s: _mlx_lm_cache("KVCache")(), "KVCache"),
    Counterpart("rotating", lambda cfg, s: {"max_size": s.window, "keep": 4},
                lambda cfg, s: _mlx_lm_cache("RotatingKVCache")(max_size=s.window, keep=4),
                "RotatingKVCache"),
    Counterpart("quantized", lambda cfg, s: {"bits": 4, "group_size": _group_size(cfg)},
                lambda cfg, s: _mlx_lm_cache("QuantizedKVCache")(group_size=_group_size(cfg), bits=4),
                "QuantizedKVCache"),
]
"""kvzoo cache <-> mlx-lm cache. An entry is used only if its kvzoo cache is registered."""

NO_CACHE = "none"  # recompute the whole prefix at every step

CONFIGS = {
    # name: (family, full preset, quick preset, quick overrides: mlx-lm's GPT-2 needs
    # head_dim * n_heads == d_model and d_ff == 4 * d_model)
    "gpt2": ("gpt2", "124m", "tiny", {"d_model": 128, "head_dim": 32, "d_ff": 512}),
    "llama": ("llama", "small", "tiny", {}),
}


@dataclass
class Settings:
    prompt: int = 512
    decode: int = 256
    repeats: int = 3
    contexts: tuple = (128, 256, 512, 1024, 2048, 4096)
    sweep_decode: int = 32
    sweep_repeats: int = 3
    none_decode: int = 3  # recompute steps per run: each one is a full forward of the prefix
    none_max_context: int = 1024
    window: int = 512  # rotating cache size
    quick: bool = False
    dtype: str = "float32"
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool, smoke: bool) -> "Settings":
        if smoke:  # the test suite's run: every code path, seconds
            return cls(prompt=16, decode=4, repeats=1, contexts=(16, 32), sweep_decode=2,
                       sweep_repeats=1, none_decode=1, none_max_context=32, window=16, quick=True)
        if quick:
            return cls(prompt=128, decode=128, repeats=5, contexts=(64, 128, 256, 512, 1024),
                       sweep_decode=32, sweep_repeats=3, none_decode=4, none_max_context=512,
                       window=64, quick=True)
        return cls()


# -- timing ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Progress:
    """A one-line progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def step(self, label: str, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + bar[:120].ljust(120))
        else:
            sys.stderr.write(bar + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class Side:
    """One library's way to run the shared weights: model, cache factory, generation loop."""

    name: str
    model: Any
    make_cache: Callable[[], Optional[list]]  # None: no cache
    forward: Callable[[mx.array, Optional[list]], mx.array]  # tokens [1, L] -> logits [1, L, V]
    generate: Callable[[mx.array, list, int], Any]  # (prompt, cache, max_tokens) -> token iterator
    synchronize: Callable[[], None] = mx.synchronize  # wait for work the loop left in flight


def kvzoo_side(model, cache_name: str, options: dict) -> Side:
    from ..generate import generate_step

    def make():
        return None if cache_name == NO_CACHE else caches.make(cache_name, model, **options)

    return Side(
        "kvzoo", model, make,
        lambda tokens, cache: model(tokens, cache, check_tokens=False),
        lambda prompt, cache, n: (t for t, _ in generate_step(
            model, prompt, cache=cache, max_tokens=n, sampler=greedy_sample)),
    )


def mlx_lm_side(twin, factory: Optional[Callable[[], Any]]) -> Side:
    from mlx_lm.generate import generate_step, generation_stream

    def make():
        return None if factory is None else [factory() for _ in twin.layers]

    return Side(
        "mlx-lm", twin, make,
        lambda tokens, cache: twin(tokens, cache=cache),
        lambda prompt, cache, n: (t for t, _ in generate_step(
            prompt, twin, prompt_cache=cache, max_tokens=n, sampler=greedy_sample)),
        lambda: mx.synchronize(generation_stream),  # mlx-lm decodes on its own stream
    )


def _cache_state(cache: Optional[list]) -> list:
    return [] if cache is None else [c.state for c in cache]


def time_prefill(side: Side, prompt: mx.array) -> float:
    """Seconds to the first token's logits for `prompt` [P], from an empty cache.

    With a cache: all but the last token through it (evaluating the cache), then the last token
    to logits, as both generation loops do. Without one: one forward of the whole prompt.
    """
    cache = side.make_cache()
    mx.eval(prompt)
    start = time.perf_counter()
    if cache is None:
        logits = side.forward(prompt[None], None)[:, -1, :]
    else:
        if prompt.size > 1:
            side.forward(prompt[None, :-1], cache)
            mx.eval(_cache_state(cache))
        logits = side.forward(prompt[None, -1:], cache)[:, -1, :]
    mx.eval(mx.argmax(logits, axis=-1), _cache_state(cache))
    return time.perf_counter() - start


def time_decode(side: Side, prompt: mx.array, n: int, cache: Optional[list] = None) -> float:
    """Seconds per token for `n` greedy tokens after the first (which includes the prefill).

    With a cache, through the library's own generation loop; `cache` may arrive already holding
    tokens (the context sweep), the prompt then continues it. Without a cache, every step
    recomputes the whole prefix (same loop shape on both sides).
    """
    if cache is None:
        cache = side.make_cache()
    if cache is None:
        return _time_recompute(side, prompt, n)
    tokens = side.generate(prompt, cache, n + 1)
    next(tokens)  # prefill + first token: not decode
    start = time.perf_counter()
    count = sum(1 for _ in tokens)  # each token is .item()-ed by the loop: evaluated
    seconds = time.perf_counter() - start
    assert count == n, (count, n)
    side.synchronize()  # mlx-lm's loop leaves one step in flight: finish it before the next run
    return seconds / n


def _time_recompute(side: Side, prompt: mx.array, n: int) -> float:
    tokens = prompt
    next_token = mx.argmax(side.forward(tokens[None], None)[:, -1, :], axis=-1)
    mx.eval(next_token)
    start = time.perf_counter()
    for _ in range(n):
        tokens = mx.concatenate([tokens, next_token.astype(tokens.dtype)])
        next_token = mx.argmax(side.forward(tokens[None], None)[:, -1, :], axis=-1)
        mx.eval(next_token)
    return (time.perf_counter() - start) / n


def alternate(runs: int, measure: dict[str, Callable[[], float]], progress: Progress, label: str,
              warmup: Optional[dict[str, Callable[[], Any]]] = None) -> dict[str, list[float]]:
    """Warm up each side (`warmup`, or one measurement), then measure `runs` times alternating
    kvzoo and mlx-lm; seconds per call."""
    for fn in (warmup or measure).values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in measure}
    for _ in range(runs):
        for name, fn in measure.items():
            out[name].append(fn())
            mx.clear_cache()
        progress.step(label)
    return out


# -- machine limits -------------------------------------------------------------------------


def memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth in GB/s: the best of summing a large array with numpy (SIMD, one
    thread; the number a decode kernel could reach) and with MLX (what MLX's CPU reduction gets).
    """
    import numpy as np

    host = np.ones(nbytes // 4, dtype=np.float32)
    device = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(device)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return nbytes / min(times) / 1e9

    result = {"numpy_sum_gbs": best(lambda: host.sum()),
              "mlx_sum_gbs": best(lambda: mx.eval(device.sum()))}
    result["bandwidth_gbs"] = max(result.values())
    return result


def weight_bytes_per_token(model) -> int:
    """Parameter bytes a decode step reads: everything but the rows of lookup tables it skips
    (the learned position table; the input embedding when it is not also the output head)."""
    from mlx.utils import tree_flatten

    total = 0
    for name, value in tree_flatten(model.parameters()):
        lookup_only = name.endswith("wpe.weight") or name.endswith("embed_positions.weight")
        if not model.config.tie_embeddings and ("wte" in name or "embed_tokens" in name):
            lookup_only = True
        total += value.size * value.itemsize // (value.shape[0] if lookup_only else 1)
    return total


# -- one model config -----------------------------------------------------------------------


def _selected_caches(selected: Optional[list[str]]) -> list[str]:
    """Every registered cache (default) or the chosen ones, checked against the registry."""
    registered = caches.available()
    if selected is None:
        return registered
    unknown = [name for name in selected if name not in registered + [NO_CACHE]]
    if unknown:
        raise ValueError(f"unknown cache(s) {unknown} for the benchmark; choose from: "
                         f"{', '.join(registered + [NO_CACHE])}")
    return [name for name in registered if name in selected]


def _entries(cfg, settings: "Settings", selected: Optional[list[str]]) -> list[tuple]:
    """(cache, options, mlx-lm name, mlx-lm cache factory or None, has an mlx-lm side) for every
    benchmarked cache: its mlx-lm counterpart's options where there is one, else the first option
    set the cache declares for this model (`caches.examples`), timed on the kvzoo side only."""
    counterparts = {c.cache: c for c in COUNTERPARTS}
    out = []
    for name in _selected_caches(selected):
        twin = counterparts.get(name)
        if twin is not None:
            out.append((name, twin.options(cfg, settings), twin.mlx_lm_name,
                        lambda twin=twin: twin.mlx_lm(cfg, settings), True))
            continue
        options = caches.examples(name, head_dim=cfg.head_dim, seq_len=settings.prompt + settings.decode)
        out.append((name, options[0] if options else None, "-", None, False))
    if selected is None or NO_CACHE in selected:
        out.append((NO_CACHE, {}, "no cache", None, True))
    return out


def _build_models(config: str, settings: Settings):
    from ..checkpoints.mlx_lm import to_mlx_lm

    family, preset, quick_preset, quick_overrides = CONFIGS[config]
    overrides = dict(quick_overrides) if settings.quick else {}
    longest = max(tuple(settings.contexts) + (settings.prompt,)) + max(settings.decode, settings.sweep_decode) + 2
    if family == "gpt2":  # learned positions: a table long enough for the sweep
        overrides["max_positions"] = max(1024, longest)
    elif settings.quick:
        overrides["max_positions"] = max(256, longest)
    model = build(family, preset=quick_preset if settings.quick else preset, seed=settings.seed,
                  dtype=parse_dtype(settings.dtype), **overrides)
    return model, to_mlx_lm(model)


def _random_tokens(n: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(0, vocab, (n,), key=mx.random.key(seed)).astype(mx.int32)


def bench_config(config: str, settings: Settings, selected: Optional[list[str]], limit_gbs: float,
                 progress: Progress) -> dict[str, Any]:
    model, twin = _build_models(config, settings)
    cfg = model.config
    prompt = _random_tokens(settings.prompt, cfg.vocab_size, settings.seed + 1)
    weight_bytes = weight_bytes_per_token(model)
    limit = limit_gbs * 1e9 / weight_bytes
    rows, skipped = [], []
    usable = []
    for entry in _entries(cfg, settings, selected):
        name, options = entry[0], entry[1]
        try:
            if options is None:
                raise ValueError(f"{name} declares no option set for head size {cfg.head_dim}")
            kvzoo_side(model, name, options).make_cache()
        except (ValueError, TypeError) as error:  # e.g. a group size that does not fit the heads
            skipped.append({"cache": name, "options": options, "reason": str(error)})
            progress.step(f"{config} {name} skipped", 2 * settings.repeats
                          + len(settings.contexts) * settings.sweep_repeats)
            continue
        usable.append(entry)
    entries = usable
    for name, options, lm_name, factory, has_twin in entries:
        ours, theirs = kvzoo_side(model, name, options), mlx_lm_side(twin, factory)
        label = f"{config} {name}"
        sides = {"kvzoo": ours, "mlx_lm": theirs} if has_twin else {"kvzoo": ours}
        prefill = alternate(settings.repeats, {
            key: lambda side=side: time_prefill(side, prompt) for key, side in sides.items()},
            progress, label + " prefill")
        n = settings.none_decode if name == NO_CACHE else settings.decode
        warm = min(n, 8)  # compiles and allocates what decode needs; the long runs are timed
        decode = alternate(settings.repeats, {
            key: lambda side=side: time_decode(side, prompt, n) for key, side in sides.items()},
            progress, label + " decode",
            warmup={key: lambda side=side: time_decode(side, prompt, warm) for key, side in sides.items()})
        rows.append({
            "cache": name, "options": options, "mlx_lm": lm_name,
            "prefill": _rates(prefill, settings.prompt),
            "decode": {**_rates(decode, 1), "tokens": n,
                       "fraction_of_limit": {side: _median([1 / s for s in runs]) / limit
                                             for side, runs in decode.items()}},
            "nbytes_per_token": _bytes_per_token(model, name, options, prompt),
        })
    sweep = sweep_contexts(model, twin, entries, settings, progress, config)
    return {
        "family": cfg.family, "config": cfg.to_dict(), "params": model.n_params,
        "weight_bytes_per_token": weight_bytes, "limit_tokens_per_s": limit,
        "results": rows, "sweep": sweep, "skipped": skipped,
    }


def _rates(runs: dict[str, list[float]], tokens: int) -> dict[str, Any]:
    """Median tokens/s per side and the kvzoo/mlx-lm ratio (None without an mlx-lm side),
    from seconds per run."""
    rates = {side: [tokens / s for s in seconds] for side, seconds in runs.items()}
    medians = {side: _median(r) for side, r in rates.items()}
    ratio = medians["kvzoo"] / medians["mlx_lm"] if "mlx_lm" in medians else None
    return {"tokens_per_s": {"mlx_lm": None, **medians}, "runs_tokens_per_s": rates, "ratio": ratio}


def _bytes_per_token(model, name: str, options: dict, prompt: mx.array) -> Optional[float]:
    """Cache bytes per token held after the prompt went through (None without a cache)."""
    if name == NO_CACHE:
        return None
    cache = caches.make(name, model, **options)
    model(prompt[None], cache, check_tokens=False)
    mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache) / max(min(c.size() for c in cache), 1)


def _fill(cache: list, keys: mx.array, values: mx.array, chunk: int) -> None:
    """Write keys/values [1, Hkv, context, D] into each layer's cache, `chunk` tokens at a time."""
    for layer in cache:
        for start in range(0, keys.shape[2], chunk):
            layer.update_and_fetch(keys[..., start:start + chunk, :], values[..., start:start + chunk, :])
    mx.eval(_cache_state(cache))


def sweep_contexts(model, twin, entries, settings: Settings, progress: Progress, config: str) -> list:
    """Decode tokens/s and cache bytes at each context, kvzoo and mlx-lm side by side."""
    cfg = model.config
    dtype = _first_dtype(model)
    out = []
    last = _random_tokens(1, cfg.vocab_size, settings.seed + 2)
    for name, options, lm_name, factory, has_twin in entries:
        ours, theirs = kvzoo_side(model, name, options), mlx_lm_side(twin, factory)
        for context in settings.contexts:
            label = f"{config} sweep {name} @{context}"
            if name == NO_CACHE:
                if context > settings.none_max_context:
                    progress.step(label + " (skipped)", settings.sweep_repeats)
                    continue
                prefix = _random_tokens(context, cfg.vocab_size, settings.seed + 3)
                runs = alternate(settings.sweep_repeats, {
                    "kvzoo": lambda: time_decode(ours, prefix, settings.none_decode),
                    "mlx_lm": lambda: time_decode(theirs, prefix, settings.none_decode)},
                    progress, label)
                nbytes = {"kvzoo": 0, "mlx_lm": 0}
            else:
                chunk = min(512, settings.window) if name == "rotating" else 512
                shape = (1, cfg.n_kv_heads, context, cfg.head_dim)
                keys = mx.random.normal(shape, key=mx.random.key(context)).astype(dtype)
                values = mx.random.normal(shape, key=mx.random.key(context + 1)).astype(dtype)
                mx.eval(keys, values)
                filled: dict[str, int] = {}

                def run(side: Side, key: str) -> float:
                    cache = side.make_cache()
                    _fill(cache, keys, values, chunk)
                    filled[key] = sum(c.nbytes for c in cache)  # bytes at exactly `context`
                    return time_decode(side, last, settings.sweep_decode, cache)

                sides = {"kvzoo": ours, "mlx_lm": theirs} if has_twin else {"kvzoo": ours}
                runs = alternate(settings.sweep_repeats, {
                    key: lambda side=side, key=key: run(side, key) for key, side in sides.items()},
                    progress, label)
                nbytes = {"mlx_lm": None, **filled}
            rates = _rates(runs, 1)
            out.append({"cache": name, "context": context, "tokens_per_s": rates["tokens_per_s"],
                        "ratio": rates["ratio"], "nbytes": nbytes})
    return out


def _first_dtype(model) -> mx.Dtype:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())[0][1].dtype


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny presets, short prompt and sweep (about a minute)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write bench.json (and bench.png with matplotlib) into this folder")
    parser.add_argument("--configs", default="gpt2,llama",
                        help=f"comma-separated model configs: {', '.join(CONFIGS)}")
    parser.add_argument("--caches", default=None,
                        help="comma-separated caches (default: every registered cache, the ones "
                             f"with an mlx-lm counterpart side by side with it, and {NO_CACHE!r})")
    parser.add_argument("--dtype", default="auto",
                        help="auto (the device default, float32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (median)")
    parser.add_argument("--contexts", default=None, help="comma-separated sweep contexts")
    parser.add_argument("--no-sweep", action="store_true", help="skip the context sweep")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--speculative", metavar="MODEL_PATH", default=None,
                        help="instead: speculative decoding (prompt lookup, and --draft) against plain "
                             "decoding on this checkpoint, on text that repeats its prompt and text that does not")
    parser.add_argument("--draft", metavar="MODEL_PATH", default=None,
                        help="with --speculative: a smaller draft model sharing the tokenizer")
    parser.add_argument("--batch", action="store_true",
                        help="instead: batched decoding of ragged prompts (batch 1, 4, 8, 16) against "
                             "mlx-lm's BatchGenerator, every cache that serves ragged rows")
    parser.add_argument("--vs-llamacpp", nargs="?", const="llama-bench", default=None, metavar="LLAMA_BENCH",
                        help="instead: kvzoo and mlx-lm against llama.cpp's llama-bench (on PATH, or this "
                             "path) on the same GGUF: --gguf files, or the llama config written with gguf-py")
    parser.add_argument("--gguf", default=None, metavar="FILES",
                        help="with --vs-llamacpp: comma-separated GGUF files to run (default: write the "
                             "llama config's random weights in each --file-types type)")
    parser.add_argument("--file-types", default="F32", metavar="TYPES",
                        help="with --vs-llamacpp and no --gguf: comma-separated F32, F16, Q8_0")
    parser.add_argument("--prompt", type=int, default=None, help="with --vs-llamacpp: prompt tokens")
    parser.add_argument("--tokens", type=int, default=None, help="with --vs-llamacpp: decoded tokens")
    parser.add_argument("--threads", type=int, default=None,
                        help="with --vs-llamacpp: llama.cpp threads (default: every core)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: seconds


def _csv(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("expected a comma-separated list, got an empty one")
    return items


def run(args: argparse.Namespace) -> int:
    if args.draft and not args.speculative:
        raise ValueError("--draft needs --speculative MODEL_PATH (the model it drafts for)")
    if args.speculative:
        return _run_speculative(args)
    llamacpp_only = [f"--{n.replace('_', '-')}" for n in ("gguf", "prompt", "tokens", "threads")
                     if getattr(args, n, None) is not None]
    if args.vs_llamacpp is None and (llamacpp_only or args.file_types != "F32"):
        raise ValueError(f"{', '.join(llamacpp_only) or '--file-types'} only apply with --vs-llamacpp")
    if args.vs_llamacpp is not None:
        return _run_llamacpp(args)
    if args.out is not None:
        _check_writable(args.out)  # now, not after the benchmark
    if args.batch:
        return _run_batch(args)
    settings = Settings.for_mode(args.quick, getattr(args, "smoke", False))
    settings.dtype = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[
        parse_dtype(args.dtype)]
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        settings.repeats = settings.sweep_repeats = args.repeats
    if args.contexts is not None:
        try:
            settings.contexts = tuple(int(c) for c in _csv(args.contexts))
        except ValueError:
            raise ValueError(f"--contexts must be comma-separated ints, got {args.contexts!r}") from None
        if min(settings.contexts) < 1:
            raise ValueError("--contexts must be positive")
    if args.no_sweep:
        settings.contexts = ()
    configs = _csv(args.configs)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; choose from: {', '.join(CONFIGS)}")
    selected = _csv(args.caches)
    entries = len(_selected_caches(selected)) + (1 if selected is None or NO_CACHE in selected else 0)
    per_config = entries * (2 * settings.repeats + len(settings.contexts) * settings.sweep_repeats)
    progress = Progress(per_config * len(configs), enabled=not args.no_progress)

    from .info import collect

    report: dict[str, Any] = {
        "machine": collect(measure=True),
        "settings": settings.__dict__ | {"contexts": list(settings.contexts)},
        "default_dtype": str(default_dtype()),
        "decode_step": ("compiled over preallocated caches (zoo/runtime/compiled.py)"
                        if compiled_enabled() else "plain (KVZOO_COMPILE=off)"),
        "loadavg_start": list(os.getloadavg()),
        "bandwidth": memory_bandwidth(),
        "configs": {},
    }
    started = time.perf_counter()
    try:
        for config in configs:
            report["configs"][config] = bench_config(
                config, settings, selected, report["bandwidth"]["bandwidth_gbs"], progress)
    finally:
        progress.close()
    report["loadavg_end"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - started
    print(format_report(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
        has_sweep = any(r["sweep"] for r in report["configs"].values())
        written = plot(report, args.out / "bench.png") if has_sweep else None
        print(f"\nwrote {args.out / 'bench.json'}" + (
            f" and {written}" if written else " (no sweep, no plot)" if not has_sweep
            else " (no plot: pip install 'kvzoo[bench]' for matplotlib)"))
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from . import bench_batch

    if args.out is not None:
        _check_writable(args.out)
    dtype = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[parse_dtype(args.dtype)]
    return _timed_section(args, "batch", lambda progress: bench_batch.run(
        quick=args.quick, smoke=getattr(args, "smoke", False), dtype=dtype, selected=_csv(args.caches),
        repeats=args.repeats, progress=progress), bench_batch.format_rows)


def _run_llamacpp(args: argparse.Namespace) -> int:
    from ..checkpoints.gguf_write import FILE_TYPES
    from . import bench_llamacpp

    if args.out is not None:
        _check_writable(args.out)
    file_types = _csv(args.file_types)
    unknown = [t for t in file_types if t not in FILE_TYPES]
    if unknown:
        raise ValueError(f"--file-types: unknown {unknown}; choose from {', '.join(FILE_TYPES)}")
    return _timed_section(args, "llamacpp", lambda progress: bench_llamacpp.run(
        args.vs_llamacpp, _csv(args.gguf), file_types=file_types, quick=args.quick or getattr(args, "smoke", False),
        prompt=args.prompt, tokens=args.tokens, rounds=args.repeats, threads=args.threads, progress=progress),
        bench_llamacpp.format_rows)


def _timed_section(args: argparse.Namespace, key: str, compute: Callable[[Callable[[str], None]], dict],
                   format_rows: Callable[[dict], str]) -> int:
    """Run one bench section under a progress line, with the load average before and after;
    print it, and write it to --out as bench_<key>.json beside the machine's description."""
    from .info import collect

    progress = Progress(1, enabled=not args.no_progress)
    loadavg = list(os.getloadavg())
    try:
        section = compute(lambda label: progress.step(label, 0))
    finally:
        progress.close()
    section["loadavg_start"], section["loadavg_end"] = loadavg, list(os.getloadavg())
    print(format_rows(section))
    print(f"load average {loadavg[0]:.1f} at the start, {section['loadavg_end'][0]:.1f} at the end")
    if args.out is not None:
        report = {"machine": collect(measure=False), key: section}
        (args.out / f"bench_{key}.json").write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out / f'bench_{key}.json'}")
    return 0


def _run_speculative(args: argparse.Namespace) -> int:
    from . import bench_speculative
    from .info import collect

    if args.out is not None:
        _check_writable(args.out)
    progress = Progress(2 * (2 if args.draft else 1) * (2 if args.quick or args.smoke else 5),
                        enabled=not args.no_progress)
    try:
        section = bench_speculative.run(args.speculative, args.draft, quick=args.quick or args.smoke,
                                        progress=progress.step)
    finally:
        progress.close()
    print(bench_speculative.format_rows(section["rows"]))
    if args.out is not None:
        report = {"machine": collect(measure=False), "speculative": section}
        (args.out / "bench_speculative.json").write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out / 'bench_speculative.json'}")
    return 0


def _check_writable(folder: Path) -> None:
    """Fail now, not after the benchmark, if `folder` cannot hold the report."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".kvzoo-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {folder} is not a writable folder: {error}") from None


# -- output ---------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    b = report["machine"]["blas"]
    s = report["settings"]
    bw = report["bandwidth"]
    lines = [
        f"BLAS: {b['summary']}",
        f"      libmlx's cblas_sgemm -> {b['bound'] or 'unknown'}; fp32 {b['n']}^3 matmul "
        f"{b['mlx_sgemm_gflops']:.0f} GFLOP/s; one-row product {b.get('row_product_gbs', 0):.1f} GB/s",
        f"      kvzoo decode step: {report.get('decode_step', 'plain')}",
        f"memory read bandwidth {bw['bandwidth_gbs']:.1f} GB/s (numpy sum {bw['numpy_sum_gbs']:.1f}, "
        f"MLX sum {bw['mlx_sum_gbs']:.1f}); load average {report['loadavg_start'][0]:.2f} at start",
        f"dtype {s['dtype']}; prompt {s['prompt']}, decode {s['decode']} tokens; median of "
        f"{s['repeats']} alternating runs after a warm-up; ratio = kvzoo / mlx-lm (>1: kvzoo faster)",
    ]
    for config, result in report["configs"].items():
        lines += ["", f"{config}: {result['params'] / 1e6:.1f}M params, "
                  f"{result['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token -> "
                  f"limit {result['limit_tokens_per_s']:.1f} tokens/s",
                  f"{'cache':<14}{'mlx-lm':<20}{'prefill tok/s':>22}{'ratio':>7}"
                  f"{'decode tok/s':>22}{'ratio':>7}{'of limit':>14}"]
        for row in result["results"]:
            p, d = row["prefill"], row["decode"]
            frac = d["fraction_of_limit"]
            lines.append(
                f"{row['cache']:<14}{row['mlx_lm']:<20}"
                f"{p['tokens_per_s']['kvzoo']:>10.1f} /{_num(p['tokens_per_s']['mlx_lm'], '9.1f')}"
                f"{_num(p['ratio'], '7.2f')}"
                f"{d['tokens_per_s']['kvzoo']:>10.2f} /{_num(d['tokens_per_s']['mlx_lm'], '9.2f')}"
                f"{_num(d['ratio'], '7.2f')}"
                f"{frac['kvzoo']:>7.0%} /{_num(frac.get('mlx_lm'), '5.0%')}")
        for row in result.get("skipped", []):
            lines.append(f"{row['cache']:<14}skipped: {row['reason']}")
        if not result["sweep"]:
            continue
        lines.append("context sweep: decode tok/s kvzoo / mlx-lm (ratio), cache MB kvzoo / mlx-lm")
        contexts = sorted({p["context"] for p in result["sweep"]})
        lines.append(f"{'cache':<14}" + "".join(f"{c:>26}" for c in contexts))
        for name in dict.fromkeys(p["cache"] for p in result["sweep"]):
            points = {p["context"]: p for p in result["sweep"] if p["cache"] == name}
            speed, size = f"{name:<14}", f"{'':<14}"
            for c in contexts:
                p = points.get(c)
                if p is None:
                    speed += f"{'-':>26}"
                    size += f"{'':>26}"
                    continue
                t = p["tokens_per_s"]
                ratio = "    -" if p["ratio"] is None else f"{p['ratio']:.2f}"
                speed += f"{t['kvzoo']:>9.1f} /{_num(t['mlx_lm'], '7.1f')} ({ratio})"
                mb = p["nbytes"]
                theirs = None if mb["mlx_lm"] is None else mb["mlx_lm"] / 1e6
                size += f"{mb['kvzoo'] / 1e6:>14.1f} /{_num(theirs, '7.1f')} MB  "
            lines += [speed, size]
    lines.append(f"\n{report['seconds']:.0f}s; load average {report['loadavg_end'][0]:.2f} at the end")
    return "\n".join(lines)


def _num(value: Optional[float], spec: str) -> str:
    """`value` formatted to `spec`, or a right-aligned "-" of the same width when missing."""
    width = int(spec.split(".")[0] or 0)
    return f"{'-':>{width}}" if value is None else format(value, ">" + spec)


def plot(report: dict[str, Any], path: Path) -> Optional[Path]:
    """Decode tokens/s and cache bytes against context, per config; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    configs = list(report["configs"])
    fig, axes = plt.subplots(2, len(configs), figsize=(6 * len(configs), 8), squeeze=False)
    for column, config in enumerate(configs):
        sweep = report["configs"][config]["sweep"]
        speed, size = axes[0][column], axes[1][column]
        for index, name in enumerate(dict.fromkeys(p["cache"] for p in sweep)):
            points = sorted((p for p in sweep if p["cache"] == name), key=lambda p: p["context"])
            x = [p["context"] for p in points]
            color = f"C{index}"
            speed.plot(x, [p["tokens_per_s"]["kvzoo"] for p in points], "-o", color=color,
                       label=f"{name} kvzoo")
            twin = all(p["tokens_per_s"]["mlx_lm"] is not None for p in points)
            if twin:
                speed.plot(x, [p["tokens_per_s"]["mlx_lm"] for p in points], "--x", color=color,
                           label=f"{name} mlx-lm")
            if name != NO_CACHE:
                size.plot(x, [p["nbytes"]["kvzoo"] / 1e6 for p in points], "-o", color=color,
                          label=f"{name} kvzoo")
                if twin:
                    size.plot(x, [p["nbytes"]["mlx_lm"] / 1e6 for p in points], "--x", color=color,
                              label=f"{name} mlx-lm")
        for ax in (speed, size):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.grid(True, alpha=0.3)
        speed.set_yscale("log")
        speed.set_title(f"{config}: decode tokens/s")
        size.set_title(f"{config}: cache MB")
        speed.legend(fontsize=7)
        size.legend(fontsize=7)
    fig.suptitle(f"kvzoo vs mlx-lm ({report['settings']['dtype']}); BLAS: "
                 f"{'fast' if report['machine']['blas']['fast'] else 'bundled'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
