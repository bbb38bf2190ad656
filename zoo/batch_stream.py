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
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx

import sampling
from caches import Cache
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

    prompt_tps: the first batch's prompt tokens per second (padding not counted);
    generation_tps: generated tokens per second over every row, from the first token on (prompts
    that join later are prefilled inside that time). cache_bytes: what the caches held after
    the first prefill, all rows (the most seen when rows joined later); cache_bytes_per_row:
    that over the first batch's rows; padding_slots / padding_overhead: the first batch's left
    padding slots and their share of its slots.
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
    batch_size: Optional[int] = None,
    result: Optional[BatchResult] = None,
) -> Iterator[tuple[int, GenerationResponse]]:
    """Generate a reply to every prompt at once, yielding (row, GenerationResponse) per token.

    `row` is the prompt's index. Each row ends on its own (EOS, a stop string, its max_tokens);
    its last response has `finish_reason` set, and it then yields nothing more. Sampling
    options (temp, top_p, top_k, min_p, seed, repetition_penalty, repetition_context_size,
    logit_bias, max_tokens) are one value for every row or a list of one per prompt; `sampler`
    one sampler or one per row. `stop` and `logits_processors` apply to every row.
    `batch_size`: at most this many rows decode together; as a row ends, the next prompt joins
    the running batch (continuous batching, for caches with `extend_rows`; otherwise the prompts
    run in groups of batch_size one after another). A `result` (BatchResult) is filled with
    the texts, tokens and statistics as the rows finish. Options are checked before anything runs.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("batch_stream needs a non-empty list of prompts (text or token ids)")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be None (all at once) or an int >= 1, got {batch_size!r}")
    n = len(prompts)
    stops = _stop_strings(stop)
    samplers = _row_samplers(n, sampler, dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed))
    processors = _row_processors(n, repetition_penalty, repetition_context_size, logit_bias, logits_processors or [])
    limits = _per_row(max_tokens, n, "max_tokens")
    ids = [_encode(tokenizer, p, add_bos) for p in prompts]
    model_vocab = model.config.vocab_size
    vocab_size = tokenizer.vocab_size if tokenizer.vocab_size < model_vocab else None
    size = min(batch_size or n, n)

    def rows_of(first: int, count: int) -> dict[str, Any]:
        chosen = slice(first, first + count)
        return dict(samplers=samplers[chosen] if isinstance(samplers, list) else samplers,
                    logits_processors=processors[chosen])

    def decoder_for(first: int) -> BatchDecoder:
        return BatchDecoder(model, ids[first : first + size], cache=cache, cache_options=cache_options,
                            prefill_step=prefill_step, vocab_size=vocab_size, **rows_of(first, size))

    decoder = decoder_for(0)  # checks the cache and the prompts before anything runs
    texts = [_RowText(tokenizer, stops, any(tokenizer.token_bytes(int(t)) for t in p if 0 <= int(t) < tokenizer.vocab_size))
             for p in ids]
    result = result if result is not None else BatchResult([], [], [])
    result.texts[:] = [""] * n
    result.tokens[:] = [[] for _ in range(n)]
    result.stats[:] = [RowStats(len(p)) for p in ids]
    continuous = size < n and type(decoder.caches[0])._extend_rows is not Cache._extend_rows \
        and decoder.cache_spec is not None
    return _events(decoder, decoder_for, rows_of, ids, texts, limits, size, continuous, result)


def _events(decoder: BatchDecoder, decoder_for, rows_of, ids: list[list[int]], texts: list[_RowText],
            limits: list[int], size: int, continuous: bool,
            result: BatchResult) -> Iterator[tuple[int, GenerationResponse]]:
    n = len(ids)
    tic = time.perf_counter()
    start = None
    prompt_tps = 0.0
    generated = 0
    base, waiting = 0, size  # the decoder's row 0 is prompt `base`; prompts from `waiting` on wait
    while True:
        prompt_of = {r: base + r for r in range(min(size, n - base))}  # decoder row -> prompt index
        for local, token, logprobs in decoder.run(limits[base : base + size]):
            row = prompt_of[local]
            if start is None:  # the first token: the first batch's prefill is over
                start = time.perf_counter()
                prompt_tps = sum(decoder.lengths) / max(start - tic, 1e-9)
                result.prompt_tps = prompt_tps
                result.cache_bytes = decoder.cache_bytes()
                result.cache_bytes_per_row = result.cache_bytes / len(decoder.prompts)
                result.padding_slots = sum(decoder.padding)
                result.padding_overhead = result.padding_slots / (len(decoder.padding) * max(decoder.lengths))
            stats = result.stats[row]
            stats.generation_tokens += 1
            generated += 1
            text, finish = texts[row].add(token, stats.generation_tokens == limits[row])
            elapsed = max(time.perf_counter() - start, 1e-9)
            if finish is not None:
                decoder.finish(local)
                stats.finish_reason = finish
                stats.generation_tps = stats.generation_tokens / elapsed
                while continuous and waiting < n and limits[waiting] == 0:  # nothing to generate
                    waiting += 1
                if continuous and waiting < n:  # the next prompt takes the row's place
                    (joined,) = decoder.add([ids[waiting]], max_tokens=[limits[waiting]], **rows_of(waiting, 1))
                    prompt_of[joined] = waiting
                    waiting += 1
                    result.cache_bytes = max(result.cache_bytes, decoder.cache_bytes())
            result.texts[row] += text
            result.tokens[row].append(token)
            result.generation_tps = generated / elapsed
            result.peak_memory = mx.get_peak_memory() / 1e9
            yield row, GenerationResponse(
                text=text, token=token, logprobs=logprobs, prompt_tokens=len(ids[row]),
                prompt_tps=prompt_tps, generation_tokens=stats.generation_tokens,
                generation_tps=stats.generation_tokens / elapsed, peak_memory=result.peak_memory,
                finish_reason=finish)
        if continuous or waiting >= n:
            break
        base, waiting = waiting, waiting + size  # groups: the next batch_size prompts
        decoder = decoder_for(base)
    for stats in result.stats:
        if stats.finish_reason is None:  # max_tokens 0
            stats.finish_reason = "length"


def batch_generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Union[str, Sequence[int], mx.array]],
    **options: Any,
) -> BatchResult:
    """One reply per prompt, each equal to what that prompt gets alone, with per-row stats.

    Takes the options of `batch_stream` (`batch_size` included) except `result`.
    """
    if "result" in options:
        raise TypeError("batch_generate returns its result; 'result' is batch_stream's option")
    result = BatchResult([], [], [])
    for _ in batch_stream(model, tokenizer, prompts, result=result, **options):
        pass
    return result
