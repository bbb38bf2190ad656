"""`kvzoo study`: models x caches over a text; perplexity, KL against the exact cache, passkey
retrieval, bytes and speed against context; study.json and PNG plots into --out, a table on
stdout (zoo/study/)."""

from __future__ import annotations

import argparse
from typing import Optional

HELP = ("study what each cache does to real models over a text: perplexity vs position, KL/top-1/"
        "delta ppl vs the exact cache, passkey retrieval, bytes and tokens/s vs context")


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def _depths(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"needle depths must be in [0, 1], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="PATH",
                        help="a model zoo.load reads (HF folder or .gguf); repeatable")
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to teacher-force")
    parser.add_argument("--caches", required=True, metavar="SPEC[,SPEC...]",
                        help="cache specs NAME[:option=value...], e.g. concat,rotating:max_size=64:keep=4,"
                             "quantized:bits=4; option=a/b/c sweeps values")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for study.json and the PNGs")
    parser.add_argument("--quick", action="store_true", help="a few hundred tokens, small grids (seconds)")
    parser.add_argument("--baseline", metavar="SPEC",
                        help="the exact cache to compare with (default: the model's default cache)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="use the first N tokens of the text")
    parser.add_argument("--chunk", type=int, metavar="N", help="tokens per forward when teacher forcing")
    parser.add_argument("--prefill", type=int, metavar="N",
                        help="teacher-force the first N tokens in chunks, then one token per forward, as "
                             "decoding feeds a cache (for caches that act at the end of a prefill: snapkv)")
    parser.add_argument("--window", type=int, metavar="N", help="scored tokens per perplexity window")
    parser.add_argument("--contexts", type=_ints, metavar="N,N,...", help="contexts of the cost sweep")
    parser.add_argument("--decode", type=int, metavar="N", help="timed decode steps per context")
    parser.add_argument("--needle-contexts", type=_ints, metavar="N,N,...", help="passkey prompt lengths")
    parser.add_argument("--needle-depths", type=_depths, metavar="D,D,...", help="passkey depths in [0, 1]")
    parser.add_argument("--needle-trials", type=int, metavar="N", help="passkeys per context x depth")
    parser.add_argument("--no-needle", action="store_true", help="skip the passkey test")
    parser.add_argument("--no-cost", action="store_true", help="skip the bytes/speed sweep")
    parser.add_argument("--no-plots", action="store_true", help="write study.json only")
    parser.add_argument("--seed", type=int, help="passkey seed")


def settings_from(args: argparse.Namespace):
    """Settings (quick or full) with every option the user gave."""
    from ..study import Settings

    overrides: dict = {}
    for flag in ("baseline", "max_tokens", "chunk", "prefill", "window", "contexts", "decode", "needle_contexts",
                 "needle_depths", "needle_trials", "seed"):
        value: Optional[object] = getattr(args, flag)
        if value is not None:
            overrides[flag] = value
    for flag in ("max_tokens", "chunk", "prefill", "window", "decode", "needle_trials"):
        if flag in overrides and overrides[flag] < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {overrides[flag]}")
    if args.no_needle:
        overrides["needle"] = False
    if args.no_cost:
        overrides["cost"] = False
    return Settings.quick(**overrides) if args.quick else Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    from ..study import parse_list, study

    specs = parse_list(args.caches)  # refuse a bad spec before any model loads
    settings = settings_from(args)
    result = study(args.model, args.text, specs, out=args.out, quick=args.quick, settings=settings,
                   plots=not args.no_plots)
    from ..study.runner import format_table

    print(format_table(result))
    failed = [(f"{m['path']} {r['cache']}", r["conformance"].get("problem")) for m in result["models"]
              for r in m["runs"] if r.get("conformance", {}).get("ok") is False]
    for label, problem in failed:
        print(f"conformance FAILED: {label} does not match its declared reference on this model"
              + (f": {problem}" if problem else ""))
    print(f"\nwrote {args.out}/study.json ({result['seconds']:.0f} s)")
    return 1 if failed else 0
