"""Perplexity over a long text, teacher-forced through a cache one chunk at a time.

Memory stays bounded by the chunk: each chunk's logits [1, L, V] become log-probabilities of
the next tokens and are reduced to one number per token before the next chunk runs; no
full-sequence logits are ever kept. Token i's prediction (logits at position i) scores token
i + 1, so a text of N tokens gives N - 1 scored tokens.

    nll = token_nll(model, tokens, caches.make("concat", model), chunk=256)   # numpy [N - 1]
    token_nll(model, tokens, cache, chunk=256, prefill=512)   # 512 in chunks, then one at a time
    perplexity(nll)                         # exp(mean nll)
    windows(nll, 128)                       # perplexity of positions 1..128, 129..256, ...
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np


def check_tokens(tokens: Sequence[int], chunk: int) -> mx.array:
    """The tokens as int32 [N] (N >= 2) and the chunk size checked; ValueError otherwise."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1 (tokens per forward), got {chunk!r}")
    array = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"perplexity needs a flat sequence of at least 2 tokens, got shape {array.shape}")
    return array.astype(mx.int32)


def spans(n: int, chunk: int, prefill: Optional[int] = None) -> Iterator[tuple[int, int]]:
    """(start, stop) of each forward over positions 0..n-1: chunks of `chunk` tokens; with
    `prefill`, chunks only up to position `prefill`, then one token per forward, as decoding
    feeds a cache (caches that act at the end of a prefill, like SnapKV, act there)."""
    if prefill is not None and (not isinstance(prefill, int) or isinstance(prefill, bool) or prefill < 1):
        raise ValueError(f"prefill must be None or an int >= 1 (tokens fed in chunks), got {prefill!r}")
    start = 0
    while start < n:
        if prefill is not None and start >= prefill:
            stop = start + 1
        else:
            stop = min(start + chunk, n, prefill if prefill is not None else n)
        yield start, stop
        start = stop


def chunk_logprobs(model: Any, cache: list, tokens: mx.array, chunk: int, *,
                   prefill: Optional[int] = None) -> Iterator[tuple[int, mx.array, mx.array]]:
    """Yield (start, logprobs [L, V], targets [L]) for consecutive chunks of `tokens` [N]
    fed through `cache` (`spans`): logprobs[j] is the model's next-token distribution after
    token start + j, targets[j] = tokens[start + j + 1]. The last token is never fed (nothing
    scores it). The cache's state is evaluated after each chunk, so the graph never grows."""
    n = tokens.size - 1  # positions that predict a token
    for start, stop in spans(n, chunk, prefill):
        logits = model(tokens[None, start:stop], cache, check_tokens=False)[0]  # [L, V]
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logprobs, [c.state for c in cache])
        yield start, logprobs, tokens[start + 1 : stop + 1]


def target_logprobs(logprobs: mx.array, targets: mx.array) -> mx.array:
    """log p(target) per row: logprobs [L, V], targets [L] -> [L]."""
    return mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]


def token_nll(model: Any, tokens: Sequence[int], cache: list, *, chunk: int = 256,
              prefill: Optional[int] = None) -> np.ndarray:
    """Negative log-likelihood (nats) of tokens 1..N-1 given those before, through `cache`
    (fresh, one per layer) in chunks of `chunk` tokens (`spans`): float64 [N - 1]."""
    tokens = check_tokens(tokens, chunk)
    out = np.empty(tokens.size - 1, dtype=np.float64)
    for start, logprobs, targets in chunk_logprobs(model, cache, tokens, chunk, prefill=prefill):
        out[start : start + targets.size] = -np.array(target_logprobs(logprobs, targets))
    return out


def perplexity(nll: np.ndarray) -> float:
    """exp(mean negative log-likelihood)."""
    nll = np.asarray(nll, dtype=np.float64)
    if nll.size == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(math.exp(nll.mean()))


def windows(nll: np.ndarray, window: int) -> list[dict[str, float]]:
    """Perplexity per window of `window` scored tokens, in order: [{"start", "stop", "ppl"}],
    where start..stop-1 are the positions of the scored tokens (position 1 is the first token
    that has something before it); the last window may be shorter."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1 (scored tokens per window), got {window!r}")
    nll = np.asarray(nll, dtype=np.float64)
    out = []
    for begin in range(0, nll.size, window):
        part = nll[begin : begin + window]
        out.append({"start": begin + 1, "stop": begin + 1 + part.size, "ppl": perplexity(part)})
    return out
