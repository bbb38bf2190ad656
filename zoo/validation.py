"""Checks of what user code hands the generation loop, and of what it hands back.

Two kinds of check live here:

- Arguments (`check_generate_arguments`, `check_text_arguments`): run when `generate_step` /
  `stream_generate` is *called*, not at the first `next()`, so a bad argument fails where it was
  written. Each error names the argument and says what is allowed.
- Returns of samplers and logits processors (`checked_logits`, `checked_token`, `Verdict`):
  shape and dtype are checked while the step's graph is built (free: MLX knows shapes lazily);
  what needs values (a token inside the vocabulary, at least one token still possible, finite
  model logits) is computed into the step's graph as one small boolean array and read together
  with the token the loop reads anyway, so checking costs no extra synchronisation. A token
  the sampler put outside the vocabulary is never fed to the model (it is replaced by 0 in the
  pipelined next step, which is then rolled back), so a bad sampler is a ValueError that names
  it, not a crash inside MLX.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import mlx.core as mx

from caches import Cache

MAX_SEED = 2**64  # mx.random.key takes a uint64


def describe(f: Any) -> str:
    """A name for a user function in an error: its qualified name and where it was defined
    (a tuple of functions: each, for a check that covers them together)."""
    if isinstance(f, tuple):
        return " / ".join(describe(g) for g in f)
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or repr(f)
    code = getattr(f, "__code__", None)
    if code is not None:
        return f"{name} ({code.co_filename}:{code.co_firstlineno})"
    return name if name != repr(f) else f"{type(f).__name__} object {f!r}"


def check_count(name: str, value: Any, low: int) -> int:
    """`value` as an int >= low; bools are refused (True is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_seed(seed: Any) -> Optional[int]:
    """None or an int in [0, 2**64) (what mx.random.key accepts)."""
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
    return seed


def check_prompt_tokens(prompt_tokens: Any) -> None:
    """Refuse what cannot be token ids before MLX tries to make an array of it."""
    if isinstance(prompt_tokens, (str, bytes)):
        raise TypeError(
            f"prompt_tokens must be token ids (a list of ints or an int mx.array), got a "
            f"{type(prompt_tokens).__name__} {prompt_tokens[:40]!r}; encode text with a tokenizer "
            f"(tokenizer.encode(text)) or call zoo.generate(model, tokenizer, text)")
    if prompt_tokens is None or isinstance(prompt_tokens, (int, float, dict, set)):
        raise TypeError(f"prompt_tokens must be a list of token ids or an int mx.array, got "
                        f"{type(prompt_tokens).__name__}")


def check_callables(sampler: Any, logits_processors: Any) -> None:
    """A sampler must be callable; logits processors a sequence of callables."""
    if sampler is not None and not callable(sampler):
        raise TypeError(f"sampler must be a function log-probabilities [1, V] -> token [1], got "
                        f"{type(sampler).__name__}")
    if logits_processors is None:
        return
    if callable(logits_processors) or isinstance(logits_processors, (str, bytes)):
        raise TypeError("logits_processors must be a list of functions (tokens, logits) -> logits, "
                        "got a single function; wrap it in a list")
    for i, process in enumerate(logits_processors):
        if not callable(process):
            raise TypeError(f"logits_processors[{i}] must be a function (tokens, logits) -> logits, "
                            f"got {type(process).__name__}")


def check_generate_arguments(arguments: dict[str, Any]) -> None:
    """Everything `generate_step` can check before it runs, raised at call time.

    `arguments`: generate_step's bound arguments (defaults applied). The prompt is validated
    whole here, including that every prompt position fits the model's position table, so a
    prompt that cannot fit fails before its first chunk changes the cache.
    """
    from .generate import prompt_array  # the loop's own prompt check: ids, shape, vocabulary

    from .batch import is_batch

    model = arguments["model"]
    check_count("max_tokens", arguments["max_tokens"], 0)
    check_count("prefill_step", arguments["prefill_step"], 1)
    vocab_size = arguments["vocab_size"]
    if vocab_size is not None:
        check_count("vocab_size", vocab_size, 1)
    if is_batch(arguments["prompt_tokens"]):  # zoo/batch.py checks samplers per row
        if arguments["draft"] is not None or arguments["prompt_lookup"] is not None:
            raise ValueError("speculative decoding runs one prompt at a time; pass a single prompt")
        for row in arguments["prompt_tokens"]:
            model.positional.check_positions(0, prompt_array(model, row).size)
        return
    check_callables(arguments["sampler"], arguments["logits_processors"])
    check_prompt_tokens(arguments["prompt_tokens"])
    prompt = prompt_array(model, arguments["prompt_tokens"])
    cache = arguments["cache"]
    offset = 0
    if cache is not None and not isinstance(cache, (str, bytes)):
        layers = list(cache)
        if layers and all(isinstance(c, Cache) for c in layers):
            offset = check_in_step(layers)
            from .fingerprint import check as same_model

            same_model(layers, model)  # here too: compiled decode steps do not pass model.__call__
    model.positional.check_positions(offset, prompt.size)


def check_text_arguments(*, stop: Any, add_bos: Any, seed: Any) -> None:
    """stream_generate's own arguments: stop strings, add_bos, seed."""
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)):
            raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__} {stop!r}")
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TypeError(f"add_bos must be True, False or None (the tokenizer's convention), got {add_bos!r}")
    check_seed(seed)


def check_in_step(cache: Sequence[Cache]) -> int:
    """The common offset of a model's per-layer caches; ValueError naming the layers whose
    offsets disagree (trimming one layer and not the others makes positions ambiguous)."""
    first = cache[0].offset
    for i, c in enumerate(cache):
        if c.offset != first:
            offsets = [c.offset for c in cache]
            raise ValueError(
                f"the layers' caches are out of step: layer 0 holds {first} tokens but layer {i} "
                f"holds {c.offset} (all offsets: {offsets}); every layer must hold the same tokens "
                f"(trim all of them together, or build a fresh cache with caches.make)")
    return first


# -- what samplers and processors return ------------------------------------------------------


def checked_logits(out: Any, process: Callable, shape: tuple) -> mx.array:
    """A logits processor's return: an mx.array of the logits' shape [1, V], floating point."""
    if not isinstance(out, mx.array):
        raise TypeError(f"logits processor {describe(process)} returned {type(out).__name__}; it must "
                        f"return the logits (an mx.array of shape {list(shape)})")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"logits processor {describe(process)} returned shape {list(out.shape)}; it must "
                         f"return logits of the shape it was given, {list(shape)}")
    if not mx.issubdtype(out.dtype, mx.floating):
        raise TypeError(f"logits processor {describe(process)} returned {out.dtype} values; logits "
                        f"must be floating point")
    return out


def checked_token(token: Any, sampler: Callable) -> mx.array:
    """A sampler's return: an int mx.array of shape [1] (a [1, 1] is accepted and flattened)."""
    if not isinstance(token, mx.array):
        raise TypeError(f"sampler {describe(sampler)} returned {type(token).__name__}; it must return "
                        f"the token id as an int mx.array of shape [1]")
    if token.size != 1 or token.ndim > 2:
        raise ValueError(f"sampler {describe(sampler)} returned shape {list(token.shape)}; it must "
                         f"return one token id, shape [1]")
    if not mx.issubdtype(token.dtype, mx.integer):
        raise TypeError(f"sampler {describe(sampler)} returned {token.dtype} values; token ids must be "
                        f"integers (use mx.argmax / mx.random.categorical)")
    return token.reshape(1)


def trusted(sampler: Callable) -> bool:
    """kvzoo's own samplers (the sampling package) return ids inside the vocabulary by
    construction (argmax / categorical over the logits), so their range check is skipped."""
    return getattr(sampler, "__module__", "").split(".")[0] == "sampling"


class Verdict:
    """What one step's values must satisfy, as one boolean in the step's graph, read when the
    token is read; on failure `problem()` finds the culprit and names it.

    The cheap signal is the log-normaliser of the final logits: it is NaN when any logit is
    NaN, +inf when one is +inf, -inf when all are -inf (no token possible), so one isfinite on
    it covers the model's logits and every processor at once. Only a sampler not from the
    sampling package adds a range check (its token is then fed through `mx.where`, so an id
    outside the vocabulary never reaches the embedding)."""

    def __init__(self, raw_logits: mx.array) -> None:
        self.stages: list[tuple[Any, mx.array]] = [(None, raw_logits)]  # kept for the diagnosis only
        self.sampler: Any = None
        self.vocab = 0
        self.flag: mx.array = mx.array(True)

    def processed(self, logits: mx.array, process: Any) -> None:
        self.stages.append((process, logits))

    def finite(self, lse: mx.array) -> None:
        """Record the check on the log-normaliser(s) of the final logits."""
        self.flag = mx.all(mx.isfinite(lse))

    def sampled(self, token: mx.array, sampler: Callable, vocab: int, lse: mx.array) -> mx.array:
        """Record the checks; return the token made safe to feed to the model."""
        self.finite(lse)
        if trusted(sampler):
            return token.astype(mx.int32) if token.dtype != mx.int32 else token
        self.sampler, self.vocab = sampler, vocab
        inside = mx.all((token >= 0) & (token < vocab))
        self.flag = self.flag & inside
        return mx.where(inside, token, 0).astype(mx.int32)

    def array(self) -> mx.array:
        return self.flag

    def problem(self, evaluated: mx.array) -> Optional[str]:
        """None when the step was sound, else what went wrong (`evaluated`: `array()`, evaluated)."""
        if evaluated.item():
            return None
        raw = self.stages[0][1]
        if not mx.all(mx.isfinite(raw)).item():
            return ("the model's logits are NaN or infinite: its weights or activations are not "
                    "finite (a corrupt checkpoint, or a dtype too narrow for this model)")
        for process, logits in self.stages[1:]:
            if not (mx.all(logits < float("inf")) & mx.any(mx.isfinite(logits))).item():
                return (f"logits processor {describe(process)} left no token possible (every logit "
                        f"-inf) or returned NaN / +inf logits; it must leave at least one finite logit")
        if self.sampler is not None:
            return (f"sampler {describe(self.sampler)} returned a token id outside the vocabulary "
                    f"(ids must be in [0, {self.vocab}))")
        return "the logits left no token possible (NaN or infinite after padding)"


def rollback(cache: Sequence[Cache], n: int) -> None:
    """Undo the last `n` fed tokens of a pipelined step that will not be used (when the caches
    can trim; a cache that cannot keeps them, and the error says so)."""
    if n and all(c.is_trimmable() for c in cache):
        for c in cache:
            c.trim(n)


def checked_at_call(check: Callable[[dict[str, Any]], None]) -> Callable:
    """Decorate a generator function so that `check(bound arguments)` runs when it is called,
    not at the first `next()` (a generator's body only starts then); and, when it is given a
    list of caches, so that the list is held by one thread while it runs (zoo/ownership.py)."""
    import functools
    import inspect

    def wrap(generator: Callable) -> Callable:
        signature = inspect.signature(generator)

        @functools.wraps(generator)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(bound.arguments)
            steps = generator(*args, **kwargs)
            cache = bound.arguments.get("cache")
            if cache is not None and not isinstance(cache, (str, bytes)):
                layers = list(cache)
                if layers and all(isinstance(c, Cache) for c in layers):
                    from .ownership import held_during

                    return held_during(layers, steps, f"{generator.__name__}")
            return steps

        return call

    return wrap
