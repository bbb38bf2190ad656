"""An approximate cache against the exact one on the same model: llama.cpp's statistics.

`perplexity --kl-divergence` in llama.cpp compares a model's next-token distributions with a
base run's: the mean and the 99th percentile of KL(base || test) per token, how often the two
agree on the most likely token, and the change in perplexity. Here the base run is the same
model through an exact cache, and both runs advance in lockstep one chunk at a time, so only
per-token numbers are kept (never logits of the whole text): memory is bounded by the chunk.

    result = compare(model, tokens, base=caches.make("preallocated", model),
                     tests={"rotating:max_size=64:keep=4": caches.make("rotating", model, ...)})
    result.base_nll                # float64 [N - 1]
    result.tests["..."].kl         # KL(base || test) per scored token, nats
    summarize(result.base_nll, result.tests["..."])   # the statistics as a dict
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .perplexity import check_tokens, chunk_logprobs, perplexity, target_logprobs


@dataclass
class Run:
    """Per scored token, for one cache run in lockstep with the base run."""

    nll: np.ndarray  # -log p(next token), nats
    kl: np.ndarray  # KL(base || this) over the vocabulary, nats
    top1: np.ndarray  # bool: this run's most likely token is the base run's
    error: Optional[str] = None  # why the run stopped early (positions scored so far are kept)
    scored: int = 0  # tokens scored before it stopped (all of them when error is None)
    peak_bytes: int = 0  # most cache bytes held after any chunk


@dataclass
class Comparison:
    base_nll: np.ndarray
    base_peak_bytes: int = 0
    tests: dict[str, Run] = field(default_factory=dict)


def compare(model: Any, tokens: Sequence[int], base: list, tests: dict[str, list], *,
            chunk: int = 256, prefill: Optional[int] = None,
            progress: Optional[Callable[[int], None]] = None) -> Comparison:
    """Teacher-force `tokens` through `base` (an exact cache) and every cache in `tests` (label ->
    fresh per-layer cache) in lockstep, chunk by chunk (`perplexity.spans`: with `prefill`, one
    token per forward after the first `prefill`, as decoding feeds a cache). A test cache that raises (say, a full
    fixed-capacity buffer) stops there with the error recorded; the others go on.
    `progress(n)` is called with the tokens each chunk scored."""
    tokens = check_tokens(tokens, chunk)
    n = tokens.size - 1
    base_nll = np.empty(n, dtype=np.float64)
    runs = {label: Run(np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=bool)) for label in tests}
    base_peak = 0
    for start, base_lp, targets in chunk_logprobs(model, base, tokens, chunk, prefill=prefill):
        stop = start + targets.size
        base_peak = max(base_peak, sum(c.nbytes for c in base))
        base_nll[start:stop] = -np.array(target_logprobs(base_lp, targets))
        base_p = mx.exp(base_lp)
        base_top = mx.argmax(base_lp, axis=-1)
        for label, cache in tests.items():
            run = runs[label]
            if run.error is not None:
                continue
            try:
                logits = model(tokens[None, start:stop], cache, check_tokens=False)[0].astype(mx.float32)
            except (ValueError, TypeError) as error:
                run.error = f"stopped at position {start}: {error}"
                continue
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [L, V]
            kl = mx.sum(base_p * (base_lp - lp), axis=-1)  # [L]
            top1 = mx.argmax(lp, axis=-1) == base_top
            nll = -target_logprobs(lp, targets)
            mx.eval(kl, top1, nll, [c.state for c in cache])
            run.kl[start:stop] = np.array(kl)
            run.top1[start:stop] = np.array(top1)
            run.nll[start:stop] = np.array(nll)
            run.scored = stop
            run.peak_bytes = max(run.peak_bytes, sum(c.nbytes for c in cache))
        if progress:
            progress(targets.size * (1 + len(tests)))
    return Comparison(base_nll, base_peak, runs)


def summarize(base_nll: np.ndarray, run: Run) -> dict[str, Any]:
    """llama.cpp's statistics for one run over the tokens it scored: mean KL (with its standard
    error), 99th-percentile KL, max KL, top-1 agreement, both perplexities, their difference
    and ratio; and the most cache bytes the run held."""
    n = run.scored
    if n == 0:
        return {"scored_tokens": 0, "error": run.error}
    kl = np.maximum(run.kl[:n], 0.0)  # float noise can make an exact run's KL -1e-9
    base_ppl, ppl = perplexity(base_nll[:n]), perplexity(run.nll[:n])
    return {
        "scored_tokens": n,
        "kl_mean": float(kl.mean()),
        "kl_mean_stderr": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(run.top1[:n].mean()),
        "ppl_base": base_ppl,
        "ppl": ppl,
        "delta_ppl": ppl - base_ppl,
        "ppl_ratio": ppl / base_ppl,
        "peak_bytes": run.peak_bytes,
        "error": run.error,
    }


def windowed_kl(run: Run, window: int) -> list[dict[str, float]]:
    """Mean KL per window of `window` scored tokens (positions as in perplexity.windows)."""
    out = []
    for begin in range(0, run.scored, window):
        part = np.maximum(run.kl[begin : min(begin + window, run.scored)], 0.0)
        out.append({"start": begin + 1, "stop": begin + 1 + part.size, "kl_mean": float(part.mean())})
    return out
