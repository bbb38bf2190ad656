"""The canonical generation loop: the same code drives every model, cache and sampler.

Prefill the prompt through the cache in chunks, then feed one token at a time. While the
current token is being evaluated, the graph for the next step is already being built
(`mx.async_eval`), as in mlx-lm.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

import caches
from caches import Cache
from sampling import Sampler, greedy_sample

from . import validation
from .model import CausalLM

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (tokens so far [N], logits [1, V])
CacheSpec = Union[str, Sequence[Cache], None]


def default_cache(model: CausalLM) -> tuple[str, dict]:
    """The cache a model gets when none is named: "preallocated", or for a model with its own
    sliding window a rotating cache of exactly that window and no sinks, which is exact
    against the true model at every length and holds no more than the window."""
    window = model.config.sliding_window
    if window is not None:
        return "rotating", dict(max_size=window, keep=0)
    return "preallocated", {}


def make_cache(model: CausalLM, cache: CacheSpec = None, cache_options: Optional[dict] = None) -> list[Cache]:
    """Resolve a cache spec: a registry name (with options), a prebuilt list, or None (the
    model's default_cache; `cache_options` then override its options)."""
    if cache is None:
        cache, defaults = default_cache(model)
        cache_options = {**defaults, **(cache_options or {})}
    if isinstance(cache, str):
        return caches.make(cache, model, **(cache_options or {}))
    if cache_options:
        raise ValueError("cache_options only apply when cache is given by name")
    cache = list(cache)
    if len(cache) != len(model.layers) or not all(isinstance(c, Cache) for c in cache):
        raise ValueError(
            f"cache must be a registry name ({', '.join(caches.available())}) or a list of "
            f"{len(model.layers)} Cache objects, one per layer"
        )
    return cache


def prompt_array(model: CausalLM, prompt_tokens: Any) -> mx.array:
    """Validate a prompt (non-empty, ids inside the vocabulary) and return it as int32 [L]."""
    tokens = mx.array(prompt_tokens) if not isinstance(prompt_tokens, mx.array) else prompt_tokens
    if tokens.ndim != 1:
        raise ValueError(f"prompt_tokens must be a flat sequence of token ids, got shape {tokens.shape}")
    if tokens.size == 0:
        raise ValueError("prompt is empty: generation needs at least one token to condition on")
    if not mx.issubdtype(tokens.dtype, mx.integer):
        raise TypeError(f"prompt token ids must be integers, got {tokens.dtype}")
    tokens = tokens.astype(mx.int32)
    from .model import check_token_range

    check_token_range(tokens, model.config.vocab_size)
    return tokens


@validation.checked_at_call(validation.check_generate_arguments)  # bad arguments fail at the call
def generate_step(
    model: CausalLM,
    prompt_tokens: Any,
    *,
    cache: CacheSpec = None,
    cache_options: Optional[dict] = None,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    max_tokens: int = 256,
    prefill_step: int = 512,
    vocab_size: Optional[int] = None,
    draft: Optional[CausalLM] = None,
    draft_cache: CacheSpec = None,
    prompt_lookup: Optional[int] = None,
    num_draft: int = 4,
    speculative_stats: Any = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs [V]) for each generated token.

    prompt_tokens: one prompt (token ids), or a batch: a list of token id lists of any lengths
    (or an int array [B, L]); a batch yields (tokens [B] as ints, logprobs [B, V]) per step, each
    row what that prompt gives alone (zoo/batch.py; zoo.batch_generate adds per-row stops).

    cache: a registry name (default: `default_cache(model)`, options in `cache_options`) or a list
    of caches, one per layer; a list that already holds tokens continues from its offset.
    sampler: log-probabilities [1, V] -> token [1]; greedy by default.
    logits_processors: f(tokens so far, logits [1, V]) -> logits, applied in order.
    prefill_step: prompt tokens per forward during prefill.
    vocab_size: the tokenizer's vocabulary, if the embedding is padded past it; padding rows
    are never sampled.
    draft / prompt_lookup: speculative decoding (zoo/speculative.py) with a smaller draft model
    sharing the tokenizer (its cache: `draft_cache`, preallocated by default) or with n-gram
    prompt lookup of size `prompt_lookup`; up to `num_draft` tokens per round. Greedy output is
    identical to plain greedy decoding; sampled output has the same distribution.
    `speculative_stats` (a zoo.speculative.SpeculativeStats) collects acceptance counts.

    Arguments are checked when it is called (zoo/validation.py); what the sampler and the
    processors return is checked every step, naming the one at fault. max_tokens=0 prefills the
    whole prompt: afterwards the cache holds exactly the tokens fed.
    """
    from .batch import is_batch

    if is_batch(prompt_tokens):  # a batch of prompts: zoo/batch.py, one (tokens [B], logprobs [B, V]) per step
        from .batch import batch_generate_step

        yield from batch_generate_step(
            model, prompt_tokens, cache=cache, cache_options=cache_options, sampler=sampler,
            logits_processors=logits_processors, max_tokens=max_tokens, prefill_step=prefill_step,
            vocab_size=vocab_size)
        return
    model_vocab = model.config.vocab_size
    if vocab_size is not None and not 1 <= vocab_size <= model_vocab:
        raise ValueError(f"vocab_size must be in [1, {model_vocab}] (the model's), got {vocab_size}")
    prompt = prompt_array(model, prompt_tokens)
    layer_caches = make_cache(model, cache, cache_options)
    sampler = sampler or greedy_sample
    processors = list(logits_processors or [])
    padding = None
    if vocab_size is not None and vocab_size < model_vocab:
        padding = mx.where(mx.arange(model_vocab) < vocab_size, 0.0, -float("inf"))
    history = prompt
    if draft is not None or prompt_lookup is not None:
        from .speculative import speculative_step

        yield from speculative_step(
            model, prompt, layer_caches, draft=draft, draft_cache=draft_cache,
            prompt_lookup=prompt_lookup, num_draft=num_draft, sampler=sampler,
            logits_processors=processors, max_tokens=max_tokens, prefill_step=prefill_step,
            padding=padding, vocab=vocab_size or model_vocab, stats=speculative_stats)
        return

    # Decode steps over preallocated caches run compiled (zoo/runtime/compiled.py; KVZOO_COMPILE=off:
    # never): the same tokens, logits equal up to summation order, less per-token overhead.
    from .runtime.compiled import CompiledDecoder

    decoder = CompiledDecoder(model) if CompiledDecoder.wanted(model) else None

    def step(tokens: mx.array) -> tuple[mx.array, mx.array, validation.Verdict, mx.array]:
        nonlocal history
        if decoder is not None and tokens.size == 1 and decoder.eligible(model, layer_caches):
            logits = decoder(tokens, layer_caches)  # [1, V]
        else:
            logits = model(tokens[None], layer_caches, check_tokens=False)[:, -1, :]  # [1, V]
        verdict = validation.Verdict(logits)  # checked with the token: no extra synchronisation
        if padding is not None:
            logits = logits + padding
        if processors:
            for process in processors:
                logits = validation.checked_logits(process(history, logits), process, logits.shape)
                verdict.processed(logits, process)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        logprobs = logits - lse
        token = verdict.sampled(validation.checked_token(sampler(logprobs), sampler), sampler,
                                vocab_size or model_vocab, lse)
        if processors:
            history = mx.concatenate([history, token])
        return token, logprobs[0], verdict, verdict.array()

    # Prefill all but the last prompt token in chunks; the last one starts decoding
    # (max_tokens=0: all of them, so the cache holds the whole prompt).
    keep_last = 1 if max_tokens else 0
    while prompt.size > keep_last:
        n = min(prefill_step, prompt.size - keep_last)
        model(prompt[:n][None], layer_caches, check_tokens=False)
        mx.eval([c.state for c in layer_caches])
        prompt = prompt[n:]

    if max_tokens == 0:
        return
    token, logprobs, verdict, flags = step(prompt)
    mx.async_eval(token, logprobs, flags)
    for n in range(max_tokens):
        cannot_continue = None
        pipelined = 0
        if n + 1 < max_tokens:
            try:
                next_token, next_logprobs, next_verdict, next_flags = step(token)  # built while `token` is evaluated
                mx.async_eval(next_token, next_logprobs, next_flags)
                pipelined = 1
            except ValueError as error:  # e.g. past a learned position table: nothing written
                cannot_continue = error
        value = token.item()
        problem = verdict.problem(flags)
        if problem is not None:  # the pipelined step fed this token: take it back out
            validation.rollback(layer_caches, pipelined)
            raise ValueError(problem)
        yield value, logprobs
        if cannot_continue is not None:
            raise cannot_continue
        if n + 1 < max_tokens:
            token, logprobs, verdict, flags = next_token, next_logprobs, next_verdict, next_flags
