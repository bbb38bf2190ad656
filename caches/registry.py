"""Cache registry: `@register(name, ...)` on a Cache subclass; `make(name, model, **options)`.

What a cache declares for verification is declared here, once, beside its name:

    @caches.register("rotating",
                     reference=lambda cache: WindowReference(cache.max_size, cache.keep),
                     examples=lambda head_dim, seq_len: [{"max_size": seq_len // 3, "keep": 2}],
                     exact=lambda seq_len, max_size, keep: seq_len <= max_size)

- `reference(cache)`: what the uncached oracle must do to reproduce this cache (default: the
  true model, `caches.EXACT`);
- `examples(head_dim, seq_len)`: option sets worth testing on such a model and sequence ([] if
  the cache cannot serve it; default `[{}]`, the defaults);
- `exact`: True when the cache reproduces the true model for every sequence, False when never,
  or a function of (seq_len, **options) for "sometimes" (default True).
- `ragged`: True when the cache serves ragged batches (rows left-padded to one length, see
  caches/base.py "Rows"); False (the default) or a string saying why not, and a batch of
  prompts of different lengths is refused with that reason.

The property test, `kvzoo check`, `kvzoo bench` and `kvzoo study` read only these, so a newly
registered cache is covered everywhere with no other edit.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from kvzoo.registry import Registry

from .base import Cache
from .reference import EXACT, Reference


@dataclass(frozen=True)
class Conformance:
    """What a registered cache declares for the conformance kit (see the module docstring)."""

    reference: Callable[[Cache], Reference] = lambda cache: EXACT
    examples: Callable[[int, int], list[dict[str, Any]]] = lambda head_dim, seq_len: [{}]
    exact: Union[bool, Callable[..., bool]] = True
    ragged: Union[bool, str] = False


def _check(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Cache)):
        raise TypeError(f"caches.register({name!r}) needs a Cache subclass, got {cls!r}")


CACHES: Registry[type[Cache]] = Registry("cache", check=_check)


def register(
    name: str,
    *,
    reference: Optional[Callable[[Cache], Reference]] = None,
    examples: Optional[Callable[[int, int], list[dict[str, Any]]]] = None,
    exact: Union[bool, Callable[..., bool]] = True,
    ragged: Union[bool, str] = False,
) -> Callable[[type[Cache]], type[Cache]]:
    """Class decorator: make a Cache subclass available as `name`, with what it declares for
    verification (module docstring)."""
    declared = Conformance(
        reference=reference or Conformance.reference,
        examples=examples or Conformance.examples,
        exact=exact,
        ragged=ragged,
    )
    if not (ragged is True or ragged is False or (isinstance(ragged, str) and ragged)):
        raise TypeError(f"caches.register({name!r}): ragged must be True, False or a reason (str), got {ragged!r}")

    def add(cls: type[Cache]) -> type[Cache]:
        CACHES.add(name, cls)
        cls.name = name
        cls.conformance = declared
        return cls

    return add


def available() -> list[str]:
    """Names of all registered caches."""
    return CACHES.available()


def get(name: str) -> type[Cache]:
    """The cache class registered as `name`."""
    return CACHES.get(name)


def options_of(name: str) -> dict[str, Any]:
    """The options a cache accepts, with their defaults."""
    params = inspect.signature(get(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def make(name: str, model: Any, **options: Any) -> list[Cache]:
    """One fresh cache per attention layer of `model` (anything with a `layers` list)."""
    cls = get(name)
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) or "none"
        raise TypeError(f"cache {name!r} got unknown option(s) {unknown}; it accepts: {listed}")
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"caches.make needs a model with a `layers` list, got {type(model).__name__}")
    caches = [cls(**options) for _ in layers]
    group = getattr(model, "heads_group", None)  # split by heads (zoo.shard): Cache.across_heads
    part = getattr(model, "distributed", None)  # zoo.distributed.Slice: which heads are here
    copies = None
    if group is not None and getattr(part, "kv_replicated", False):
        copies = (*part.kv_heads, model.config.n_kv_heads)  # Cache.across_kv_copies
    if group is not None:
        for cache in caches:
            cache.heads_group, cache.kv_copies = group, copies
    for cache in caches[:1]:
        cache.check_model(model)
    for cache in caches:
        cache.join(caches)
    return caches


def _declared(name: str) -> Conformance:
    return get(name).conformance or Conformance()


def examples(name: str, *, head_dim: int, seq_len: int) -> list[dict[str, Any]]:
    """Option sets of cache `name` worth testing on a model with this head size and a sequence
    this long ([] if the cache cannot serve such a model). The property test, `kvzoo check`,
    `kvzoo bench` and `kvzoo study` draw from it, so a registered cache is covered everywhere."""
    return list(_declared(name).examples(head_dim, seq_len))


def exact_for(name: str, *, seq_len: Optional[int] = None, **options: Any) -> bool:
    """Whether cache `name` with `options` reproduces the true uncached model (not only its own
    reference) over a sequence of `seq_len` tokens; with seq_len=None, for every sequence."""
    exact = _declared(name).exact
    if isinstance(exact, bool):
        return exact
    if seq_len is None:
        return False  # exact only sometimes
    defaults = {k: v for k, v in options_of(name).items() if v is not inspect.Parameter.empty}
    return bool(exact(seq_len=seq_len, **{**defaults, **options}))


def reference_of(name: str, **options: Any) -> Reference:
    """The reference of cache `name` built with `options` (what its uncached oracle does)."""
    return get(name)(**options).reference
