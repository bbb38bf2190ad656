"""`kvzoo bench --speculative`: speculative decoding against plain decoding, side by side.

For each task (a prompt whose continuation repeats it, a prompt that does not), alternating
runs of plain greedy decoding and of speculative decoding (prompt lookup; and a draft model
when `--draft` is given) on the same model and cache: decode tokens/s, their ratio, the
acceptance rate and tokens per model forward. Greedy output is checked identical on the way.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

import mlx.core as mx

from ..generate import generate_step
from ..speculative import SpeculativeStats

# A story opening, then the same sentence again and again: greedy continuation repeats it.
REPEATING = ("Tom had a red ball. Tom had a red ball. Tom had a red ball. Tom had a red ball. "
             "Tom had a red ball. Tom had a red ball. Tom had")
FRESH = "Once upon a time, there was a little girl named Lily. She loved to"


def _decode(model, prompt: list[int], n: int, **speculation) -> tuple[list[int], float, SpeculativeStats]:
    """(tokens, decode seconds after the first token, stats) for n greedy tokens."""
    stats = SpeculativeStats()
    steps = generate_step(model, prompt, max_tokens=n, speculative_stats=stats, **speculation)
    tokens = [next(steps)[0]]  # prefill + first token: not decode
    start = time.perf_counter()
    tokens += [t for t, _ in steps]
    return tokens, time.perf_counter() - start, stats


def bench_speculative(model, tokenizer, *, draft=None, tokens: int = 200, repeats: int = 3,
                      ngram: int = 3, num_draft: int = 6, progress=None) -> list[dict[str, Any]]:
    """One row per (task, drafter): plain and speculative decode tokens/s and what speculation did."""
    drafters = {"prompt lookup": dict(prompt_lookup=ngram, num_draft=num_draft)}
    if draft is not None:
        drafters["draft model"] = dict(draft=draft, num_draft=num_draft)
    rows = []
    for task, text in (("repeats its prompt", REPEATING), ("does not repeat", FRESH)):
        prompt = tokenizer.encode(text)
        for name, speculation in drafters.items():
            _decode(model, prompt, 8)  # warm-up: compile, allocate
            _decode(model, prompt, 8, **speculation)
            plain_s, spec_s = [], []
            for _ in range(repeats):
                plain, seconds, _ = _decode(model, prompt, tokens)
                plain_s.append(seconds)
                spec, seconds, stats = _decode(model, prompt, tokens, **speculation)
                spec_s.append(seconds)
                mx.clear_cache()
                if progress:
                    progress(f"speculative {task} {name}")
            rows.append({
                "task": task, "drafter": name, "tokens": tokens, "options": {k: v for k, v in speculation.items()
                                                                              if k != "draft"},
                "plain_tokens_per_s": (tokens - 1) / statistics.median(plain_s),
                "speculative_tokens_per_s": (tokens - 1) / statistics.median(spec_s),
                "ratio": statistics.median(plain_s) / statistics.median(spec_s),
                "acceptance_rate": stats.acceptance_rate,
                "tokens_per_forward": stats.emitted / max(stats.rounds, 1),
                "identical_to_plain": spec == plain,
            })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["speculative decoding vs plain (greedy, same model and cache; decode tok/s, median):",
             f"{'task':<20}{'drafter':<16}{'plain':>9}{'speculative':>13}{'ratio':>7}{'accepted':>10}"
             f"{'tok/forward':>13}  identical"]
    for r in rows:
        lines.append(f"{r['task']:<20}{r['drafter']:<16}{r['plain_tokens_per_s']:>9.1f}"
                     f"{r['speculative_tokens_per_s']:>13.1f}{r['ratio']:>7.2f}{r['acceptance_rate']:>10.0%}"
                     f"{r['tokens_per_forward']:>13.2f}  {'yes' if r['identical_to_plain'] else 'NO'}")
    return "\n".join(lines)


def run(model_path: str, draft_path: Optional[str], *, quick: bool, progress=None) -> dict[str, Any]:
    """Load the models (float32) and run the section; returns the report part."""
    from ..checkpoints import load, load_model

    model, tokenizer = load(model_path, dtype=mx.float32)
    draft = load_model(draft_path, dtype=mx.float32) if draft_path else None
    rows = bench_speculative(model, tokenizer, draft=draft, tokens=64 if quick else 200,
                             repeats=2 if quick else 5, progress=progress)
    return {"model": str(model_path), "draft": draft_path, "rows": rows}
