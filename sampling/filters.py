"""Truncation filters on log-probabilities [B, V]: tokens outside the kept set get -inf.

The filtering itself is mlx-lm's (`mlx_lm.sample_utils`); here are the option checks, and
the "off" values (top_k=0, top_p=1, min_p=0) that skip a filter.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import mlx.core as mx

Filter = Callable[[mx.array], mx.array]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_temperature(temp: Any) -> float:
    if not _is_number(temp) or temp < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temp!r}")
    return float(temp)


def check_top_k(top_k: Any) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {top_k!r}")
    return top_k


def check_top_p(top_p: Any) -> float:
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 keeps every token), got {top_p!r}")
    return float(top_p)


def check_min_p(min_p: Any) -> float:
    if not _is_number(min_p) or not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be a number in [0, 1] (0 keeps every token), got {min_p!r}")
    return float(min_p)


def check_min_tokens_to_keep(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {n!r}")
    return n


def top_k_filter(top_k: int) -> Optional[Filter]:
    """Keep the `top_k` most likely tokens (all of them if top_k is 0 or >= the vocabulary)."""
    top_k = check_top_k(top_k)
    if top_k == 0:
        return None
    from mlx_lm.sample_utils import apply_top_k  # lazy: importing mlx_lm loads transformers and torch (seconds)

    def keep_top_k(logprobs: mx.array) -> mx.array:
        if top_k >= logprobs.shape[-1]:
            return logprobs
        return apply_top_k(logprobs, top_k)

    return keep_top_k


def top_p_filter(top_p: float) -> Optional[Filter]:
    """Keep the smallest set of most likely tokens whose probability mass reaches `top_p`."""
    top_p = check_top_p(top_p)
    if top_p == 1:
        return None
    from mlx_lm.sample_utils import apply_top_p  # lazy: importing mlx_lm loads transformers and torch (seconds)

    return lambda logprobs: apply_top_p(logprobs, top_p)


def min_p_filter(min_p: float, min_tokens_to_keep: int = 1) -> Optional[Filter]:
    """Keep tokens at least `min_p` times as likely as the most likely one."""
    min_p = check_min_p(min_p)
    min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)
    if min_p == 0:
        return None
    from mlx_lm.sample_utils import apply_min_p  # lazy: importing mlx_lm loads transformers and torch (seconds)

    return lambda logprobs: apply_min_p(logprobs, min_p, min_tokens_to_keep)
