"""Cache SPEC strings: `name:option=value:option=value`, checked against the cache registry.

    parse("rotating:max_size=64:keep=4")   # CacheSpec("rotating", {"max_size": 64, "keep": 4})
    expand("rotating:max_size=32/64:keep=0/4")   # four specs, the product of the listed values
    parse_list("concat,quantized:bits=4")  # what `kvzoo study --caches` takes

Values are ints, floats or booleans (true/false); an option whose default is an int takes only
an int, one whose default is a float takes an int or a float. Every check reads the registry
(`caches.options_of`), so a newly registered cache is accepted here with no edit; the cache's
own constructor then refuses values it cannot work with (keep >= max_size, bits 7), and that
refusal is reported with the spec that caused it.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Union

import caches

Value = Union[int, float, bool]


@dataclass(frozen=True)
class CacheSpec:
    """A registered cache name and the options to build it with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The canonical spec string, options in the order given."""
        parts = [self.name] + [f"{k}={_show(v)}" for k, v in self.options.items()]
        return ":".join(parts)

    def make(self, model: Any) -> list:
        """One cache per layer of `model` (`caches.make`)."""
        return caches.make(self.name, model, **self.options)

    def __hash__(self) -> int:
        return hash(self.label)


def _show(value: Value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _value(text: str) -> Value:
    """An int, float or bool from its text; ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(lowered)
    except ValueError:
        pass
    try:
        return float(lowered)
    except ValueError:
        raise ValueError(f"{text!r} is not an int, a float or true/false") from None


def _check_type(name: str, option: str, value: Value, default: Any) -> Value:
    """The value, if it has the kind of the option's default (None/no default: any kind)."""
    if default is inspect.Parameter.empty or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"cache {name!r} takes true or false, got {_show(value)}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"cache {name!r} takes an int here (default {default}), "
                             f"got {_show(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(f"cache {name!r} takes a number here (default {default}), "
                             f"got {_show(value)}")
        return float(value)
    return value


def _split(spec: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """(name, [(option, [value texts])]) from a spec string, checked for form only."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a cache spec is NAME or NAME:option=value[:option=value...], got {spec!r}")
    name, *pairs = [part.strip() for part in spec.strip().split(":")]
    registered = caches.available()
    if name not in registered:
        raise ValueError(f"cache spec {spec!r}: unknown cache {name!r}; registered: {', '.join(registered)}")
    allowed = caches.options_of(name)
    listed = ", ".join(allowed) or "none"
    out, seen = [], set()
    for pair in pairs:
        option, eq, text = pair.partition("=")
        option = option.strip()
        if not eq or not option or not text.strip():
            raise ValueError(f"cache spec {spec!r}: {pair!r} is not option=value; options of "
                             f"{name!r}: {listed}")
        if option not in allowed:
            raise ValueError(f"cache spec {spec!r}: cache {name!r} has no option {option!r}; "
                             f"it accepts: {listed}")
        if option in seen:
            raise ValueError(f"cache spec {spec!r}: option {option!r} given twice")
        seen.add(option)
        out.append((option, text.split("/")))
    return name, out


def expand(spec: str) -> list[CacheSpec]:
    """Every CacheSpec a spec string names: `option=a/b/c` lists values, and the spec expands to
    the product of all lists. Each is built once without a model, so the cache's own refusals
    (options that cannot work together) come out here, naming the spec."""
    name, pairs = _split(spec)
    allowed = caches.options_of(name)
    choices = []
    for option, texts in pairs:
        values = []
        for text in texts:
            try:
                value = _check_type(name, option, _value(text), allowed[option])
            except ValueError as error:
                raise ValueError(f"cache spec {spec!r}: option {option}: {error}") from None
            values.append(value)
        choices.append([(option, v) for v in values])
    specs = []
    for combination in itertools.product(*choices):
        cache_spec = CacheSpec(name, dict(combination))
        try:
            caches.get(name)(**cache_spec.options)
        except (ValueError, TypeError) as error:
            raise ValueError(f"cache spec {cache_spec.label!r}: {error}") from None
        specs.append(cache_spec)
    return specs


def parse(spec: str) -> CacheSpec:
    """The one CacheSpec a spec string names (no value lists)."""
    specs = expand(spec)
    if len(specs) != 1:
        raise ValueError(f"cache spec {spec!r} lists several values ({len(specs)} caches); "
                         f"use expand() or give one value per option")
    return specs[0]


def parse_list(text: str) -> list[CacheSpec]:
    """Comma-separated spec strings (each may list values), expanded, duplicates dropped."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("--caches needs SPEC[,SPEC...], e.g. concat,rotating:max_size=64:keep=4")
    out: list[CacheSpec] = []
    for part in text.split(","):
        if not part.strip():
            raise ValueError(f"--caches {text!r} has an empty spec between commas")
        for cache_spec in expand(part):
            if cache_spec not in out:
                out.append(cache_spec)
    return out
