"""Helpers shared by the checkpoint and parity tests: greedy decoding oracles and cache lists."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import caches
import zoo

LOGIT_TOL = 1e-4  # fp32 logits from two implementations of the same weights


def exact_caches() -> list[str]:
    """Registered caches that reproduce the true uncached model."""
    return [name for name in caches.available() if caches.exact_for(name)]


def approximate_caches() -> list[str]:
    """Registered caches that are exact only against their own reference."""
    return [name for name in caches.available() if not caches.exact_for(name)]


def greedy_uncached(model, prompt: list[int], n: int, reference=None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from the full uncached forward at every step, and the logits [n, V] that
    chose them. The oracle every cache must reproduce (under its reference)."""
    tokens = list(prompt)
    chosen = []
    for _ in range(n):
        logits = model(mx.array([tokens]), reference=reference)[0, -1]
        chosen.append(np.array(logits))
        tokens.append(int(mx.argmax(logits).item()))
    return tokens[len(prompt):], np.stack(chosen)


def greedy_cached(model, prompt: list[int], n: int, cache, **kwargs) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and log-probabilities [n, V] from zoo.generate_step with `cache`."""
    out = list(zoo.generate_step(model, prompt, cache=cache, max_tokens=n, **kwargs))
    return [t for t, _ in out], np.stack([np.array(lp) for _, lp in out])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def assert_greedy_agrees(tokens: list[int], oracle_tokens: list[int], oracle_logits: np.ndarray,
                         tol: float = LOGIT_TOL) -> None:
    """Tokens must equal the oracle's, except where the oracle's top two logits are within
    `tol` (a tie may break either way); from the first such tie on, sequences may differ."""
    for step, (ours, theirs) in enumerate(zip(tokens, oracle_tokens)):
        if ours != theirs:
            top2 = np.sort(oracle_logits[step])[-2:]
            assert top2[1] - top2[0] <= tol, (
                f"step {step}: token {ours} != oracle's {theirs} (oracle margin {top2[1] - top2[0]:.3g}); "
                f"tokens {tokens} vs oracle {oracle_tokens}"
            )
            return
    assert len(tokens) == len(oracle_tokens)


def spread(logits: np.ndarray) -> float:
    """Standard deviation of logits: a parity check is only meaningful when this is large."""
    return float(np.std(logits))
