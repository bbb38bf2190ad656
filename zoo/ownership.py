"""Threads: one cache list is used by one thread at a time.

MLX builds and evaluates graphs on per-thread streams, and a cache is mutated in place, so two
threads feeding one cache list corrupt it (or crash inside MLX). Separate caches in separate
threads are fine and stay unchecked. What is checked:

- A forward (`model(tokens, cache)`) claims the cache list for its duration.
- A generation (`zoo.generate_step`, `zoo.stream_generate`, `zoo.generate`) claims it from its
  first step until it ends (exhausted, closed, or garbage-collected).
- A claim held by another live thread is a `CacheInUseError` naming that thread. That includes
  resuming a generator in a thread other than the one that started it.

A list is identified by its first layer's cache object (the one every forward reads). Claims
are re-entrant within a thread; a claim of a thread that has ended is void.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Optional, Sequence

import mlx.core as mx

_lock = threading.Lock()
_ATTR = "_kvzoo_claim"  # on the first layer's cache: [thread, count]


class CacheInUseError(RuntimeError):
    """A cache list was used by a thread while another thread held it."""


def claim(cache: Sequence[Any], what: str) -> Optional[list]:
    """Claim `cache` for the current thread; returns the claim record to pass to `release`
    (None when `cache` is empty). Raises CacheInUseError if another live thread holds it."""
    if not cache or not hasattr(cache[0], "__dict__"):
        return None  # nothing to hold (an object without attributes cannot carry a claim)
    first = cache[0]
    me = threading.current_thread()
    with _lock:
        held = first.__dict__.get(_ATTR)
        if held is not None and held[1] > 0 and held[0] is not me and held[0].is_alive():
            raise CacheInUseError(
                f"{what}: this cache list is in use by thread {held[0].name!r} (ident "
                f"{held[0].ident}), and this is thread {me.name!r}. A cache holds one sequence and "
                f"is updated in place, so two threads cannot feed it: give each thread its own "
                f"cache (caches.make(name, model)), and consume a generator in the thread that "
                f"started it (see docs/reliability.md, threads)")
        handover = held is not None and held[0] is not me
        if held is None or held[0] is not me or held[1] <= 0:
            held = [me, 0]
            first.__dict__[_ATTR] = held
        held[1] += 1
    if handover:  # the list comes from another thread: its arrays must be evaluated already
        try:
            mx.eval([c.state for c in cache if hasattr(type(c), "state")])
        except RuntimeError as error:
            if "Stream" not in str(error):
                raise
            release(held)
            raise CacheInUseError(
                f"{what}: this cache list holds work another thread built and has not evaluated "
                f"({error}); evaluate it in that thread (mx.eval([c.state for c in cache])) before "
                f"handing the cache over") from None
    return held


def release(record: Optional[list]) -> None:
    """Give back one claim made by `claim`."""
    if record is not None:
        with _lock:
            record[1] -= 1


def held_during(cache: Sequence[Any], steps: Iterator, what: str) -> Iterator:
    """Run the generator `steps` with `cache` claimed from its first step to its end."""
    record = claim(cache, what)
    try:
        yield from steps
    finally:
        try:
            mx.synchronize()  # work still in flight on this thread's stream (a pipelined step)
        finally:
            release(record)
