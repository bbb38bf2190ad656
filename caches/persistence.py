"""Save a model's caches to one safetensors file and load them back (prompt reuse).

    caches.save("prompt.safetensors", cache, metadata={"model": "stories260K"})
    cache, metadata = caches.load("prompt.safetensors")

The file holds each layer's `state` arrays (tensors `layer.<i>.<j>`) and, in the safetensors
metadata, each layer's registry name and `meta_state`, plus a checksum of every array and the
fingerprint of the model that filled it (a loaded cache continues only with that model). Loading
finds each class through the registry (`caches.get(name).from_state(...)`), so any registered
cache, a user's own included, round-trips; a loaded cache continues generation bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx

from .base import Cache
from .registry import get

FORMAT = "kvzoo-cache/1"
RESERVED = "kvzoo."  # metadata keys of the format itself


def save(
    path: Union[str, Path],
    cache: Union[Cache, Sequence[Cache]],
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write `cache` (one Cache or a model's list of them) and string `metadata` to `path`.

    The file is written whole under a temporary name and then renamed, so a failed save never
    leaves a half-written file at `path`.
    """
    layers = [cache] if isinstance(cache, Cache) else list(cache)
    if not layers or not all(isinstance(c, Cache) for c in layers):
        raise TypeError("caches.save needs a Cache or a non-empty list of Cache objects")
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
        if key.startswith(RESERVED):
            raise ValueError(f"metadata key {key!r}: keys starting with {RESERVED!r} are reserved")

    arrays: dict[str, mx.array] = {}
    described = []
    for i, layer in enumerate(layers):
        name = layer.name
        if not name or _registered(name) is not type(layer):
            raise ValueError(
                f"layer {i}: {type(layer).__name__} is not registered, so it could not be loaded "
                f"back; decorate it with @caches.register(name)"
            )
        if not layer.can_save():
            raise ValueError(f"layer {i}: {type(layer).__name__} cannot be saved: it does not define "
                             f"`state` and `_restore` (see docs/architecture.md)")
        state = tuple(layer.state)
        meta = dict(layer.meta_state)
        if not all(isinstance(a, mx.array) for a in state):
            raise TypeError(f"layer {i}: {name} state must be a tuple of mx.arrays")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TypeError(f"layer {i}: {name} meta_state must map str to str")
        for j, a in enumerate(state):
            arrays[f"layer.{i}.{j}"] = mx.contiguous(a)
        described.append({"cache": name, "meta": meta, "arrays": len(state)})
    mx.eval(list(arrays.values()))

    fingerprints = {layer.model_fingerprint for layer in layers}
    if len(fingerprints) > 1:
        raise ValueError("the layers' caches were filled by different models (their model "
                         "fingerprints differ); save one model's cache")
    fingerprint = fingerprints.pop()
    if fingerprint is not None:  # which model filled it (zoo/fingerprint.py): checked on use
        metadata[RESERVED + "model_fingerprint"] = fingerprint
    metadata[RESERVED + "format"] = FORMAT
    metadata[RESERVED + "layers"] = json.dumps(described)
    metadata[RESERVED + "checksum"] = _checksum(arrays)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            mx.save_safetensors(f, arrays, metadata)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def load(path: Union[str, Path]) -> tuple[list[Cache], dict[str, str]]:
    """Read a file written by `save`: (the list of caches, the user's metadata).

    A missing file is FileNotFoundError; a corrupt, truncated or foreign file (a model's
    weights, say) is ValueError saying which.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cache file at {path}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                         f"{error}") from None
    if metadata.get(RESERVED + "format") != FORMAT:
        found = metadata.get(RESERVED + "format")
        what = f"format {found!r}, expected {FORMAT!r}" if found else (
            f"no {RESERVED}format metadata; its tensors are "
            f"{', '.join(sorted(arrays)[:4]) or 'none'}{', ...' if len(arrays) > 4 else ''}")
        raise ValueError(f"{path} is not a kvzoo cache file ({what}); write one with caches.save")
    try:
        described = json.loads(metadata[RESERVED + "layers"])
        expected = {f"layer.{i}.{j}" for i, d in enumerate(described) for j in range(d["arrays"])}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: corrupt layer description in the metadata ({error})") from None
    if expected != set(arrays):
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ValueError(f"{path}: corrupt cache file: missing tensors {missing[:4]}, "
                         f"unexpected tensors {extra[:4]}")
    if _checksum(arrays) != metadata.get(RESERVED + "checksum"):
        raise ValueError(f"{path}: corrupt cache file: the arrays do not match their checksum")

    layers = []
    for i, d in enumerate(described):
        cls = get(d["cache"])  # ValueError listing the registered caches if unknown
        state = tuple(arrays[f"layer.{i}.{j}"] for j in range(d["arrays"]))
        try:
            layers.append(cls.from_state(state, dict(d["meta"])))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: layer {i} ({d['cache']}) cannot be rebuilt: "
                             f"{type(error).__name__}: {error}") from None
    fingerprint = metadata.get(RESERVED + "model_fingerprint")
    for layer in layers:
        layer.model_fingerprint = fingerprint  # the model that may continue it (checked on use)
        layer.join(layers)
    user = {k: v for k, v in metadata.items() if not k.startswith(RESERVED)}
    return layers, user


def _registered(name: str):
    try:
        return get(name)
    except ValueError:
        return None


def _checksum(arrays: dict[str, mx.array]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = mx.contiguous(arrays[name])
        mx.eval(a)
        digest.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        digest.update(memoryview(a))
    return digest.hexdigest()
