"""`kvzoo check`: every family x positional scheme x cache x attention layout against its oracle.

Each pairing runs on a tiny random-weight model: a prompt fed in uneven chunks, then greedy
decoding, compared with the uncached forward under the cache's declared reference. With
`--model PATH` the same check runs every cache on a real checkpoint and a real prompt, and the
"vs true model" column shows what each approximate cache costs that model.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import mlx.core as mx

import caches
import positional
from caches import conformance

from ..registry import available as available_families
from ..registry import build

HELP = "check every family x positional x cache x layout pairing against the uncached oracle"

LAYOUTS = {"MHA": 4, "GQA": 2, "MQA": 1}  # n_kv_heads for the tiny presets' 4 query heads
PROMPT_LEN = 24
DECODE = 12
CHUNKS = [5, 1, 11, 7]  # uneven on purpose: single-token and multi-token chunks with a warm cache
PROMPT = "Once upon a time, there was a little"  # --model's default prompt


@dataclass
class Row:
    family: str
    positional: str
    layout: str
    cache: str
    options: dict
    exact: bool  # whether the cache claims to match the true uncached model here
    report: conformance.Report

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.cache}({opts})" if opts else self.cache


def check_pairings(
    families: Optional[Iterable[str]] = None,
    schemes: Optional[Iterable[str]] = None,
    cache_names: Optional[Iterable[str]] = None,
    layouts: Optional[Iterable[str]] = None,
    seed: int = 0,
    progress=None,
    skipped: Optional[list[str]] = None,
) -> list[Row]:
    """Check every requested pairing; returns one Row per (pairing, cache option set). A cache
    that refuses a model by design (caches.Unsupported) is noted in `skipped` with its reason."""
    families = _choose(families, available_families(), "family")
    schemes = _choose(schemes, positional.available(), "positional scheme")
    cache_names = _choose(cache_names, caches.available(), "cache")
    layouts = _choose(layouts, list(LAYOUTS), "layout")
    seq_len = PROMPT_LEN + DECODE
    rows = []
    for family in families:
        for scheme in schemes:
            for layout in layouts:
                model = build(family, preset="tiny", positional=scheme,
                              n_kv_heads=LAYOUTS[layout], seed=seed)
                rng = random.Random(f"{seed}-{family}-{scheme}-{layout}")
                prompt = [rng.randrange(model.config.vocab_size) for _ in range(PROMPT_LEN)]
                for name in cache_names:
                    for options in caches.examples(name, head_dim=model.config.head_dim,
                                                   seq_len=seq_len):
                        try:
                            report = conformance.check(
                                model, lambda: caches.make(name, model, **options), prompt,
                                chunks=CHUNKS, decode=DECODE)
                        except caches.Unsupported as refusal:
                            if skipped is not None:
                                skipped.append(f"{name} on {family}/{scheme}/{layout}: {refusal}")
                            continue
                        exact = caches.exact_for(name, seq_len=seq_len, **options)
                        rows.append(Row(family, scheme, layout, name, dict(options), exact, report))
                        if progress:
                            progress(rows[-1])
    return rows


def check_checkpoint(
    path: str,
    prompt: str,
    *,
    cache_names: Optional[Iterable[str]] = None,
    decode: int = DECODE,
    progress=None,
) -> tuple[list[Row], list[str]]:
    """Every requested cache (each declared option set) on a loaded checkpoint and prompt.

    Returns the rows and a note for each cache that has no option set for this model (say,
    quantized on heads narrower than its smallest group).
    """
    from ..checkpoints import load

    if decode < 1:
        raise ValueError(f"--decode must be at least 1, got {decode}")
    cache_names = _choose(cache_names, caches.available(), "cache")
    model, tokenizer = load(path)
    tokens = tokenizer.encode(prompt)
    if len(tokens) < 2:
        raise ValueError(f"the prompt encodes to {len(tokens)} token(s); give at least 2 for a chunked prefill")
    cfg = model.config
    seq_len = len(tokens) + decode
    limit = model.positional.max_positions
    if limit is not None and seq_len > limit:
        raise ValueError(f"prompt ({len(tokens)} tokens) + --decode {decode} = {seq_len} positions, "
                         f"past this model's {limit}")
    logits = model(mx.array([tokens], dtype=mx.int32))  # [1, L, V]: the uncached forward
    finite = mx.isfinite(logits)
    if not mx.all(finite).item():
        nan = int(mx.sum(mx.isnan(logits)).item())
        raise ValueError(
            f"{path}: the model's logits are NaN or infinite on this prompt ({nan} NaN, "
            f"{int(mx.sum(~finite).item()) - nan} inf of {logits.size}): the weights or the dtype are "
            f"broken, so no cache can be checked against it")
    chunks = uneven_chunks(len(tokens))
    rows, skipped = [], []
    for name in cache_names:
        examples = caches.examples(name, head_dim=cfg.head_dim, seq_len=seq_len)
        if not examples:
            skipped.append(f"{name}: no option set fits this model (head_dim {cfg.head_dim})")
        for options in examples:
            try:
                report = conformance.check(model, lambda: caches.make(name, model, **options), tokens,
                                           chunks=chunks, decode=decode)
            except caches.Unsupported as refusal:
                skipped.append(f"{name}: {refusal}")
                break
            rows.append(Row(cfg.family, cfg.positional, cfg.layout, name, dict(options),
                            caches.exact_for(name, seq_len=seq_len, **options), report))
            if progress:
                progress(rows[-1])
    return rows, skipped


def uneven_chunks(n: int) -> list[int]:
    """Split n prompt tokens into CHUNKS-sized pieces, cycling, the last cut short: single-token
    and multi-token chunks against a warm cache."""
    chunks, left, i = [], n, 0
    while left:
        chunks.append(min(CHUNKS[i % len(CHUNKS)], left))
        left -= chunks[-1]
        i += 1
    return chunks


def _choose(requested, registered: list[str], what: str) -> list[str]:
    if not requested:
        return list(registered)
    requested = list(requested)
    for name in requested:
        if name not in registered:
            raise ValueError(f"unknown {what} {name!r}; available: {', '.join(registered)}")
    return requested


def format_table(rows: list[Row]) -> str:
    header = ["family", "positional", "layout", "cache", "max|Δlogit| ref", "greedy", "bytes/token",
              "vs true model", "status"]
    lines = []
    for r in rows:
        rep = r.report
        greedy = f"{rep.greedy_agree}/{rep.greedy_steps}" + (f" ({rep.ties} tie)" if rep.ties else "")
        true = f"exact {rep.true_max_abs_diff:.1e}" if r.exact else (
            f"Δ {rep.true_max_abs_diff:.2f}, top1 {100 * rep.true_top1_agree:.0f}%")
        diff = f"{rep.exact_diff:.1e}"
        if rep.exact_diff != rep.max_abs_diff:
            diff += f" ({rep.rounding_flips} flip{'s' if rep.rounding_flips != 1 else ''})"
        lines.append([r.family, r.positional, r.layout, r.label, diff, greedy,
                      f"{rep.bytes_per_token:,.0f}", true, "ok" if _row_ok(r) else "FAIL"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(line.rstrip() for line in out)


def _row_ok(row: Row) -> bool:
    """Exact against its reference; and, if it claims so, against the true uncached model."""
    rep = row.report
    return rep.ok and (not row.exact or rep.true_max_abs_diff <= rep.tolerance)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", nargs="+", metavar="NAME",
                        help=f"families to check (default all: {', '.join(available_families())})")
    parser.add_argument("--positional", nargs="+", metavar="NAME",
                        help=f"schemes (default all: {', '.join(positional.available())})")
    parser.add_argument("--caches", nargs="+", metavar="NAME",
                        help=f"caches (default all: {', '.join(caches.available())})")
    parser.add_argument("--layouts", nargs="+", metavar="NAME", choices=list(LAYOUTS),
                        help="attention layouts (default all: MHA GQA MQA)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed")
    parser.add_argument("--model", metavar="PATH",
                        help="check every cache on this checkpoint (HF folder or .gguf) instead of the "
                             "tiny random presets")
    parser.add_argument("--prompt", default=PROMPT,
                        help="with --model: the prompt text (default: a story opening)")
    parser.add_argument("--decode", type=int, default=DECODE,
                        help=f"with --model: greedy steps to compare (default {DECODE})")


def run(args: argparse.Namespace) -> int:
    def progress(row: Row) -> None:
        if not sys.stderr.isatty():
            return
        print(f"\r  checked {row.family}/{row.positional}/{row.layout}/{row.label}".ljust(72),
              end="", file=sys.stderr, flush=True)

    if not args.model:
        for flag, value, default in (("--decode", args.decode, DECODE), ("--prompt", args.prompt, PROMPT)):
            if value != default:
                raise ValueError(f"{flag} applies with --model PATH (a real checkpoint); the random "
                                 f"presets use a fixed prompt of {PROMPT_LEN} tokens and {DECODE} steps")
    if args.model:
        for flag, value in (("--families", args.families), ("--positional", args.positional),
                            ("--layouts", args.layouts)):
            if value:
                raise ValueError(f"{flag} chooses among the random presets; with --model the checkpoint fixes it")
        rows, skipped = check_checkpoint(args.model, args.prompt, cache_names=args.caches,
                                         decode=args.decode, progress=progress)
        setup = (f"{args.model}; prompt {args.prompt!r} in chunks of {CHUNKS} (cycled), "
                 f"{args.decode} greedy steps")
    else:
        skipped = []
        rows = check_pairings(args.families, args.positional, args.caches, args.layouts, args.seed, progress,
                              skipped=skipped)
        setup = f"prompt {PROMPT_LEN} tokens in chunks {CHUNKS}, {DECODE} greedy steps"
    print("\r".ljust(73) + "\r", end="", file=sys.stderr)
    print(format_table(rows))
    for line in skipped:
        print(f"not run: {line}")
    for row in rows:
        for problem in ([row.report.problem] if row.report.problem else []) + row.report.storage + row.report.rows:
            print(f"{row.label} ({row.family}/{row.positional}/{row.layout}): {problem}")
    if any(r.report.exact_diff != r.report.max_abs_diff for r in rows):
        print("flips: stored values one quantization step from the oracle's rounding, each on a rounding "
              "boundary (the chunked and uncached forwards differ in float summation order); those rows "
              "compare against the uncached forward over the values the cache stored.")
    failed = [r for r in rows if not _row_ok(r)]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} pairings match their reference "
          f"(tolerance {conformance.DEFAULT_TOLERANCE:g}, fp32; {setup}). "
          f"bytes/token = cache bytes held / tokens held.")
    return 1 if failed else 0
