"""Which model filled a cache: a fingerprint of the config and a cheap digest of the weights.

A cache's keys and values belong to the model that computed them; another model of the same
shape (other weights: a fine-tune, another checkpoint) would run on happily and produce a
plausible, wrong continuation. So the first forward that writes into an empty cache stamps it
with the model (`Cache.model_fingerprint`, which `caches.save` records and `caches.load`
restores), and a forward with a cache that holds tokens checks the stamp:

- the same model object, weights unchanged since: nothing to compute (the common path costs
  an identity check and a string comparison);
- another object with the same fingerprint (the same checkpoint loaded again, a cache loaded
  from a file): accepted, and the cache is re-stamped;
- another model: `ModelMismatchError`, unless the user says the cache is meant for it with
  `zoo.adopt_cache(cache, model)`.

The fingerprint is sha256 over the config (JSON) and, per parameter (in name order), its
name, shape, dtype and up to `SAMPLES` evenly spaced values: two checkpoints that differ
anywhere that training changes them differ there, and it costs a few thousand values per
tensor, not a pass over the weights. It is computed once per model and recomputed after
`model.update(...)` / `load_weights` (CausalLM.update clears it).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

SAMPLES = 4096  # values digested per tensor
_MEMO = "_kvzoo_fingerprint"


class ModelMismatchError(ValueError):
    """A cache filled by one model was used with another."""


def fingerprint(model: Any) -> str:
    """The model's fingerprint (hex), memoized on the model until its weights are updated."""
    memo = model.__dict__.get(_MEMO) if hasattr(model, "__dict__") else None
    if memo is not None:
        return memo
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    samples = []
    params = sorted(tree_flatten(model.parameters()), key=lambda item: item[0])
    for name, a in params:
        flat = a.reshape(-1)  # [N]
        stride = max(1, flat.size // SAMPLES)
        samples.append(mx.contiguous(flat[::stride][:SAMPLES].astype(mx.float32)))
        digest.update(f"|{name}|{a.shape}|{a.dtype}".encode())
    mx.eval(samples)
    for s in samples:
        digest.update(memoryview(s))
    value = digest.hexdigest()
    object.__setattr__(model, _MEMO, value)
    return value


def forget(model: Any) -> None:
    """Drop the memoized fingerprint (the weights changed)."""
    if hasattr(model, "__dict__"):
        model.__dict__.pop(_MEMO, None)


def stamp(cache: Sequence[Any], model: Any) -> None:
    """Record `model` as the one that fills `cache` (every layer)."""
    value = fingerprint(model)
    ref = weakref.ref(model)
    for c in cache:
        c.model_fingerprint = value
        c._model_ref = ref


def check(cache: Sequence[Any], model: Any) -> None:
    """Before a forward: the cache was filled by this model (or is empty), else raise.

    Cheap when it was filled by this very object; computes fingerprints otherwise."""
    first = cache[0]
    recorded = getattr(first, "model_fingerprint", None)  # (a foreign cache, mlx-lm's, has none)
    ref = getattr(first, "_model_ref", None)
    if ref is not None and ref() is model and model.__dict__.get(_MEMO) == recorded:
        return  # the same object with the same weights (an update clears the memo)
    if all(c.offset == 0 for c in cache) or recorded is None:
        stamp(cache, model)  # nothing in it yet (or filled without a model): it is this model's
        return
    mine = fingerprint(model)
    if recorded == mine:
        stamp(cache, model)
        return
    raise ModelMismatchError(
        f"this cache holds {first.offset} tokens computed by another model (fingerprint "
        f"{recorded[:12]}), not by this one ({mine[:12]}: {model.config.family}, "
        f"{model.config.n_layers} layers, d_model {model.config.d_model}); continuing it would mix "
        f"two models' keys and values. Use a fresh cache (caches.make(name, model)), or, if the "
        f"cache is meant for this model, say so with zoo.adopt_cache(cache, model)")


def adopt_cache(cache: Sequence[Any], model: Any) -> None:
    """Declare that `cache` (filled by another model, or loaded from a file) is to be continued
    with `model`: the explicit way past the fingerprint check."""
    stamp(list(cache), model)
