"""Text in, text out, for many prompts at once: `batch_stream` yields (row, response) events;
`batch_generate` returns one text per prompt with per-row statistics.

    model, tokenizer = zoo.load("stories260K.gguf")
    result = zoo.batch_generate(model, tokenizer, ["Once upon a time", "The cat"], max_tokens=50)
    result.texts                      # one reply per prompt, each what that prompt gets alone
    for row, response in zoo.batch_stream(model, tokenizer, prompts, temp=0.8, seed=[1, 2]):
        print(row, response.text)

Both run zoo/batch.py's BatchDecoder (the canonical loop with a batch dimension) and add what
zoo.stream_generate adds for one prompt, per row: encoding, streaming detokenization, stop on
EOS / stop strings / that row's max_tokens, statistics. Sampling options may be one value for
every row or a list of one per prompt; a `seed` gives every row its own random key (the same
seed in every row unless a list is given), so a row draws what it draws alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx

import sampling
from sampling import LogitsProcessor, Sampler

from .batch import BatchDecoder, _per_row
from .generate import CacheSpec
from .model import CausalLM
from .stream import GenerationResponse, _first_stop, _held_back, _stop_strings
from .tokenizers.base import Tokenizer


@dataclass
class RowStats:
    """One row's run: prompt and generated token counts, why it ended ("stop": EOS or a stop
    string, "length": its max_tokens), and its tokens per second from the start of decoding to
    its last token."""

    prompt_tokens: int
    generation_tokens: int = 0
    finish_reason: Optional[str] = None
    generation_tps: float = 0.0


@dataclass
class BatchResult:
    """What `batch_generate` returns: one text and token list per prompt, in prompt order.

    prompt_tps / generation_tps: aggregate tokens per second over the batch (real prompt tokens,
    padding not counted). cache_bytes: what the caches held after prefill, all rows;
    cache_bytes_per_row: that over the rows; padding_slots / padding_overhead: the slots of
    left padding and their share of all slots after prefill. With `batch_size`, prompts run in
    groups: the numbers are summed (bytes: the largest group's).
    """

    texts: list[str]
    tokens: list[list[int]]
    stats: list[RowStats]
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    cache_bytes: int = 0
    cache_bytes_per_row: float = 0.0
    padding_slots: int = 0
    padding_overhead: float = 0.0
    peak_memory: float = 0.0
    groups: list[dict] = field(default_factory=list)


class _RowText:
    """Streaming text of one row: detokenize, hold back what may become a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], continuation: bool) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.detokenizer = tokenizer.detokenizer(continuation=continuation)
        self.pending = ""

    def add(self, token: int, last: bool) -> tuple[str, Optional[str]]:
        """(text to release, finish reason or None) after `token`; `last`: its max_tokens."""
        finish = None
        if token in self.tokenizer.eos_ids:
            finish = "stop"
        else:
            self.pending += self.detokenizer.add_token(token)
        if finish is not None or last:
            self.pending += self.detokenizer.finalize()
        cut = _first_stop(self.pending, self.stops)
        if cut >= 0:
            text, self.pending, finish = self.pending[:cut], "", "stop"
        elif finish is None and last:
            text, self.pending, finish = self.pending, "", "length"
        elif finish is not None:
            text, self.pending = self.pending, ""
        else:
            release = len(self.pending) - _held_back(self.pending, self.stops)
            text, self.pending = self.pending[:release], self.pending[release:]
        return text, finish


def _encode(tokenizer: Tokenizer, prompt: Any, add_bos: Optional[bool]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=add_bos)
    if add_bos is not None:
        raise ValueError("add_bos applies to text prompts; token ids are used as given")
    return prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)


def _row_samplers(n: int, sampler: Any, options: dict[str, Any]) -> Union[Sampler, list[Sampler]]:
    """One sampler for every row (no per-row state), or one per row."""
    defaults = dict(temp=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None)
    changed = sorted(k for k, v in options.items() if v != defaults[k])
    if sampler is not None:
        if changed:
            raise ValueError(f"pass either a sampler or sampling options, not both (got sampler and {changed})")
        return _per_row(sampler, n, "sampler") if isinstance(sampler, (list, tuple)) else sampler
    per_row = {k: _per_row(v, n, k) for k, v in options.items()}
    if not any(isinstance(v, (list, tuple)) for v in options.values()) and options["seed"] is None:
        return sampling.make_sampler(**options)  # the same for every row: applied to the batch at once
    # Per-row options, or a seed: each row its own sampler (its own random key).
    return [sampling.make_sampler(**{k: v[r] for k, v in per_row.items()}) for r in range(n)]


def _row_processors(n: int, repetition_penalty: Any, repetition_context_size: Any, logit_bias: Any,
                    extra: Sequence[LogitsProcessor]) -> list[list[LogitsProcessor]]:
    penalties = _per_row(repetition_penalty, n, "repetition_penalty")
    contexts = _per_row(repetition_context_size, n, "repetition_context_size")
    biases = _per_row(logit_bias, n, "logit_bias")
    return [sampling.make_logits_processors(repetition_penalty=penalties[r], repetition_context_size=contexts[r],
                                            logit_bias=biases[r]) + list(extra) for r in range(n)]


def batch_stream(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Union[str, Sequence[int], mx.array]],
    *,
    max_tokens: Union[int, Sequence[int]] = 256,
    sampler: Union[Sampler, Sequence[Sampler], None] = None,
    temp: Any = 0.0,
    top_p: Any = 1.0,
    top_k: Any = 0,
    min_p: Any = 0.0,
    seed: Any = None,
    repetition_penalty: Any = None,
    repetition_context_size: Any = 20,
    logit_bias: Any = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    cache: CacheSpec = None,
    cache_options: Optional[dict] = None,
    stop: Union[str, Sequence[str], None] = None,
    prefill_step: int = 512,
    add_bos: Optional[bool] = None,
    result: Optional[BatchResult] = None,
) -> Iterator[tuple[int, GenerationResponse]]:
    """Generate a reply to every prompt at once, yielding (row, GenerationResponse) per token.

    `row` is the prompt's index. Each row ends on its own (EOS, a stop string, its max_tokens);
    its last response has `finish_reason` set, and it then yields nothing more. Sampling
    options (temp, top_p, top_k, min_p, seed, repetition_penalty, repetition_context_size,
    logit_bias, max_tokens) are one value for every row or a list of one per prompt; `sampler`
    one sampler or one per row. `stop` and `logits_processors` apply to every row. A `result`
    (BatchResult) is filled with the texts, tokens and statistics as the rows finish.
    Options are checked before anything runs.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("batch_stream needs a non-empty list of prompts (text or token ids)")
    n = len(prompts)
    stops = _stop_strings(stop)
    samplers = _row_samplers(n, sampler, dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed))
    processors = _row_processors(n, repetition_penalty, repetition_context_size, logit_bias, logits_processors or [])
    limits = _per_row(max_tokens, n, "max_tokens")
    ids = [_encode(tokenizer, p, add_bos) for p in prompts]
    model_vocab = model.config.vocab_size
    vocab_size = tokenizer.vocab_size if tokenizer.vocab_size < model_vocab else None
    decoder = BatchDecoder(model, ids, cache=cache, cache_options=cache_options, samplers=samplers,
                           logits_processors=processors, prefill_step=prefill_step, vocab_size=vocab_size)
    texts = [_RowText(tokenizer, stops, any(tokenizer.token_bytes(int(t)) for t in p if 0 <= int(t) < tokenizer.vocab_size))
             for p in ids]
    result = result if result is not None else BatchResult([], [], [])
    result.texts[:] = [""] * n
    result.tokens[:] = [[] for _ in range(n)]
    result.stats[:] = [RowStats(len(p)) for p in ids]
    return _events(decoder, texts, limits, result)


def _events(decoder: BatchDecoder, texts: list[_RowText], limits: list[int],
            result: BatchResult) -> Iterator[tuple[int, GenerationResponse]]:
    tic = time.perf_counter()
    start = None
    n_prompt = sum(decoder.lengths)
    prompt_tps = 0.0
    generated = 0
    for row, token, logprobs in decoder.run(limits):
        if start is None:  # the first token: prefill is over
            start = time.perf_counter()
            prompt_tps = n_prompt / max(start - tic, 1e-9)
            result.prompt_tps = prompt_tps
            result.cache_bytes = decoder.cache_bytes()
            result.cache_bytes_per_row = result.cache_bytes / len(decoder.prompts)
            result.padding_slots = sum(decoder.padding)
            result.padding_overhead = result.padding_slots / (len(decoder.prompts) * max(decoder.lengths))
        stats = result.stats[row]
        stats.generation_tokens += 1
        generated += 1
        text, finish = texts[row].add(token, stats.generation_tokens == limits[row])
        elapsed = max(time.perf_counter() - start, 1e-9)
        if finish is not None:
            decoder.finish(row)
            stats.finish_reason = finish
            stats.generation_tps = stats.generation_tokens / elapsed
        result.texts[row] += text
        result.tokens[row].append(token)
        result.generation_tps = generated / elapsed
        result.peak_memory = mx.get_peak_memory() / 1e9
        yield row, GenerationResponse(
            text=text, token=token, logprobs=logprobs, prompt_tokens=decoder.lengths[row],
            prompt_tps=prompt_tps, generation_tokens=stats.generation_tokens,
            generation_tps=stats.generation_tokens / elapsed, peak_memory=result.peak_memory,
            finish_reason=finish)
    for stats in result.stats:
        if stats.finish_reason is None:  # max_tokens 0
            stats.finish_reason = "length"


def batch_generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Union[str, Sequence[int], mx.array]],
    *,
    batch_size: Optional[int] = None,
    **options: Any,
) -> BatchResult:
    """One reply per prompt, each equal to what that prompt gets alone, with per-row stats.

    Takes the options of `batch_stream`. `batch_size`: at most this many prompts decode
    together (groups run one after another); None: all of them at once.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("batch_generate needs a non-empty list of prompts (text or token ids)")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be None (all at once) or an int >= 1, got {batch_size!r}")
    if "result" in options:
        raise TypeError("batch_generate returns its result; 'result' is batch_stream's option")
    n = len(prompts)
    size = batch_size or n
    per_row = {"max_tokens", "sampler", "temp", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
               "repetition_context_size", "logit_bias"}
    for key in per_row & set(options):
        _per_row(options[key], n, key)  # a list must have one entry per prompt, checked up front
    total = BatchResult([], [], [])
    prompt_time = decode_time = 0.0
    generated = 0
    for first in range(0, n, size):
        group = slice(first, min(first + size, n))
        group_options = {k: (v[group] if k in per_row and isinstance(v, (list, tuple)) else v)
                         for k, v in options.items()}
        part = BatchResult([], [], [])
        for _ in batch_stream(model, tokenizer, list(prompts[group]), result=part, **group_options):
            pass
        total.texts += part.texts
        total.tokens += part.tokens
        total.stats += part.stats
        prompt_time += sum(s.prompt_tokens for s in part.stats) / part.prompt_tps if part.prompt_tps else 0.0
        tokens = sum(s.generation_tokens for s in part.stats)
        generated += tokens
        decode_time += tokens / part.generation_tps if part.generation_tps else 0.0
        total.cache_bytes = max(total.cache_bytes, part.cache_bytes)
        total.padding_slots += part.padding_slots
        total.peak_memory = max(total.peak_memory, part.peak_memory)
        total.groups.append(dict(rows=part.stats and len(part.stats), cache_bytes=part.cache_bytes,
                                 cache_bytes_per_row=part.cache_bytes_per_row,
                                 padding_overhead=part.padding_overhead))
    total.prompt_tps = sum(s.prompt_tokens for s in total.stats) / prompt_time if prompt_time else 0.0
    total.generation_tps = generated / decode_time if decode_time else 0.0
    total.cache_bytes_per_row = max((g["cache_bytes_per_row"] for g in total.groups), default=0.0)
    total.padding_overhead = max((g["padding_overhead"] for g in total.groups), default=0.0)
    return total
