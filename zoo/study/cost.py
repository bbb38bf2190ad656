"""What a cache costs: bytes it holds and tokens/s, against context.

One cache is filled with the text's tokens up to each context in turn (prefill, in chunks,
timed), then `decode` single-token forwards are timed there (each one evaluated: a forward of
one token and its argmax, the work a decode step does), and the text continues. So one pass
gives, at every context: cache bytes, decode tokens/s (median over the steps, and the fastest
step, which on a machine shared with other jobs is the closest to the work's own cost), and the
prefill rate of the chunks that led there. Costs do not depend on the token
values, so a text shorter than the largest context is repeated.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx


def cache_bytes(cache: list) -> int:
    """Bytes held by every layer's cache."""
    return int(sum(c.nbytes for c in cache))


def _tokens_for(tokens: Sequence[int], n: int) -> mx.array:
    tokens = list(tokens)
    if not tokens:
        raise ValueError("the cost sweep needs at least one token of text")
    reps = -(-n // len(tokens))
    return mx.array((tokens * reps)[:n], dtype=mx.int32)


def cost_sweep(model: Any, tokens: Sequence[int], make_cache: Callable[[], list], contexts: Sequence[int], *,
               decode: int = 16, chunk: int = 256, max_positions: Optional[int] = None,
               progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Bytes and speed at each context (sorted, contexts past `max_positions` skipped):
    {"points": [{"context", "bytes", "bytes_per_token", "held_tokens", "decode_tokens_per_s",
    "decode_tokens_per_s_best", "prefill_tokens_per_s"}], "peak_bytes", "prefill_tokens_per_s", "skipped"}."""
    contexts = sorted(set(int(c) for c in contexts))
    if not contexts or contexts[0] < 1:
        raise ValueError(f"contexts must be ints >= 1, got {contexts}")
    if not isinstance(decode, int) or decode < 1:
        raise ValueError(f"decode must be an int >= 1 (timed steps per context), got {decode!r}")
    skipped = []
    if max_positions is not None:
        skipped = [{"context": c, "reason": f"past the model's {max_positions} positions"}
                   for c in contexts if c + decode > max_positions]
        contexts = [c for c in contexts if c + decode <= max_positions]
    if not contexts:
        return {"points": [], "peak_bytes": None, "prefill_tokens_per_s": None, "skipped": skipped}
    needed = contexts[-1] + decode * len(contexts)
    text = _tokens_for(tokens, needed)
    _warm_up(model, make_cache, text, chunk, decode)

    cache = make_cache()
    points, peak = [], 0
    prefill_tokens, prefill_seconds = 0, 0.0
    offset = 0
    for context in contexts:
        seg_tokens, seg_seconds = 0, 0.0
        while offset < context:  # prefill up to this context
            n = min(chunk, context - offset)
            begin = time.perf_counter()
            model(text[None, offset : offset + n], cache, check_tokens=False)
            mx.eval([c.state for c in cache])
            seg_seconds += time.perf_counter() - begin
            seg_tokens += n
            offset += n
            peak = max(peak, cache_bytes(cache))
            if progress:
                progress(n)
        held = cache[0].size()
        at_context = cache_bytes(cache)
        steps = []
        for _ in range(decode):  # one-token forwards, each evaluated
            begin = time.perf_counter()
            logits = model(text[None, offset : offset + 1], cache, check_tokens=False)
            mx.eval(mx.argmax(logits[:, -1, :], axis=-1), [c.state for c in cache])
            steps.append(time.perf_counter() - begin)
            offset += 1
            peak = max(peak, cache_bytes(cache))
        if progress:
            progress(decode)
        prefill_tokens += seg_tokens
        prefill_seconds += seg_seconds
        points.append({
            "context": context,
            "bytes": at_context,
            "bytes_per_token": at_context / context,
            "held_tokens": held,
            "decode_tokens_per_s": 1.0 / statistics.median(steps),
            "decode_tokens_per_s_best": 1.0 / min(steps),  # the fastest step: least disturbed by load
            "prefill_tokens_per_s": seg_tokens / seg_seconds if seg_seconds > 0 else None,
        })
    return {
        "points": points,
        "peak_bytes": peak,
        "prefill_tokens_per_s": prefill_tokens / prefill_seconds if prefill_seconds > 0 else None,
        "skipped": skipped,
    }


def _warm_up(model: Any, make_cache: Callable[[], list], text: mx.array, chunk: int, decode: int) -> None:
    """One short prefill and a few decode steps on a throwaway cache: compilation and first
    allocations are not timed."""
    cache = make_cache()
    n = min(chunk, text.size - 2)
    if n > 0:
        model(text[None, :n], cache, check_tokens=False)
        mx.eval([c.state for c in cache])
    for i in range(min(decode, 3)):
        model(text[None, n + i : n + i + 1], cache, check_tokens=False)
        mx.eval([c.state for c in cache])
