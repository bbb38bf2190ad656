"""Text in, text out: `stream_generate` yields the reply piece by piece; `generate` returns it.

    model, tokenizer = zoo.load("stories260K.gguf")
    for response in zoo.stream_generate(model, tokenizer, "Once upon a time", max_tokens=50):
        print(response.text, end="", flush=True)
    print(zoo.generate(model, tokenizer, "Once upon a time", temp=0.8, top_p=0.9, seed=0))

Both run `generate_step` (the one generation loop) and add the text side: encoding the prompt,
streaming detokenization, stop on EOS / stop strings / max_tokens, and speed statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx

import sampling
from sampling import LogitsProcessor, Sampler

from . import validation
from .generate import CacheSpec, generate_step, make_cache, prompt_array
from .model import CausalLM
from .tokenizers.base import Tokenizer


@dataclass
class GenerationResponse:
    """One generated token and the text it released.

    text: new text since the previous response ("" while a character or a possible stop
    string is held back). finish_reason: None while generating, then "stop" (EOS or a stop
    string) or "length" (max_tokens). Speeds are tokens per second; peak_memory is in GB.
    """

    text: str
    token: int
    logprobs: mx.array  # [V]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None


def _stop_strings(stop: Union[str, Sequence[str], None]) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str, got {s!r}")
    return stops


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def _sampling_options(sampler: Optional[Sampler], options: dict[str, Any]) -> Sampler:
    defaults = dict(temp=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None)
    changed = sorted(k for k, v in options.items() if v != defaults[k])
    if sampler is not None:
        if changed:
            raise ValueError(f"pass either a sampler or sampling options, not both (got sampler and {changed})")
        return sampler
    return sampling.make_sampler(**options)


def stream_generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = 20,
    logit_bias: Optional[dict] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    cache: CacheSpec = None,
    cache_options: Optional[dict] = None,
    stop: Union[str, Sequence[str], None] = None,
    prefill_step: int = 512,
    add_bos: Optional[bool] = None,
    **speculation: Any,
) -> Iterator[GenerationResponse]:
    """Generate a reply to `prompt`, yielding a `GenerationResponse` per token.

    prompt: text (encoded with BOS if the tokenizer's convention says so, or per `add_bos`)
    or token ids. Sampling: a `sampler`, or temp / top_p / top_k / min_p / seed (greedy by
    default). Logits processors: repetition_penalty, logit_bias, and any in `logits_processors`.
    cache: a registry name (with `cache_options`) or a list of caches. stop: strings that end
    generation; neither a stop string nor text that may still become one is ever yielded.
    Generation also stops at the tokenizer's EOS tokens and after `max_tokens` tokens.
    Speculative decoding: `draft=MODEL` or `prompt_lookup=N`, with `num_draft`, `draft_cache`
    and `speculative_stats` (see zoo.generate_step). Options are checked here, before anything runs.
    """
    allowed = {"draft", "draft_cache", "prompt_lookup", "num_draft", "speculative_stats"}
    if set(speculation) - allowed:
        raise TypeError(f"stream_generate got unknown option(s) {sorted(set(speculation) - allowed)}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
    if not isinstance(prefill_step, int) or isinstance(prefill_step, bool) or prefill_step < 1:
        raise ValueError(f"prefill_step must be an int >= 1, got {prefill_step!r}")
    validation.check_text_arguments(stop=stop, add_bos=add_bos, seed=seed)
    check_vocabularies(model, tokenizer)
    stops = _stop_strings(stop)
    sampler = _sampling_options(sampler, dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed))
    processors = sampling.make_logits_processors(repetition_penalty=repetition_penalty,
                                                 repetition_context_size=repetition_context_size,
                                                 logit_bias=logit_bias)
    processors += list(logits_processors or [])
    if isinstance(prompt, str):
        prompt_ids = tokenizer.encode(prompt, add_bos=add_bos)
    elif add_bos is not None:
        raise ValueError("add_bos applies to a text prompt; token ids are used as given")
    else:
        prompt_ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
    prompt_tokens = prompt_array(model, prompt_ids)  # non-empty, ids inside the model's vocabulary
    layer_caches = make_cache(model, cache, cache_options)
    model_vocab = model.config.vocab_size
    vocab_size = tokenizer.vocab_size if tokenizer.vocab_size < model_vocab else None
    # After a prompt with text in it the reply continues that text (keeps its leading space).
    continuation = any(tokenizer.token_bytes(int(t)) for t in prompt_ids if 0 <= int(t) < tokenizer.vocab_size)
    steps = generate_step(model, prompt_tokens, cache=layer_caches, sampler=sampler,
                          logits_processors=processors, max_tokens=max_tokens,
                          prefill_step=prefill_step, vocab_size=vocab_size, **speculation)
    return _responses(steps, tokenizer, stops, max_tokens, len(prompt_ids), continuation)


def check_vocabularies(model: CausalLM, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer whose ids the model's embedding cannot look up (they are not a pair)."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer and the model do not match: the tokenizer has {tokenizer.vocab_size} ids "
            f"but the model's vocabulary has {model.config.vocab_size} (ids 0..{model.config.vocab_size - 1}); "
            f"load the tokenizer that belongs to this model")


def _responses(steps, tokenizer: Tokenizer, stops: list[str], max_tokens: int, n_prompt: int,
               continuation: bool) -> Iterator[GenerationResponse]:
    detokenizer = tokenizer.detokenizer(continuation=continuation)
    pending = ""  # decoded text not yet released: it may be the start of a stop string
    tic = time.perf_counter()
    prompt_tps = 0.0
    for n, (token, logprobs) in enumerate(steps):
        if n == 0:
            prompt_tps = n_prompt / (time.perf_counter() - tic)
            tic = time.perf_counter()
        finish = None
        if token in tokenizer.eos_ids:
            finish = "stop"
        else:
            pending += detokenizer.add_token(token)
        if finish is not None or n + 1 == max_tokens:
            pending += detokenizer.finalize()
        cut = _first_stop(pending, stops)
        if cut >= 0:
            text, pending, finish = pending[:cut], "", "stop"
        elif finish is None and n + 1 == max_tokens:
            text, pending, finish = pending, "", "length"
        elif finish is not None:
            text, pending = pending, ""
        else:
            release = len(pending) - _held_back(pending, stops)
            text, pending = pending[:release], pending[release:]
        yield GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            prompt_tokens=n_prompt,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish is not None:
            return


def generate(model: CausalLM, tokenizer: Tokenizer, prompt: Union[str, Sequence[int], mx.array],
             **options: Any) -> str:
    """The reply to `prompt` as one string; takes the options of `stream_generate`."""
    return "".join(response.text for response in stream_generate(model, tokenizer, prompt, **options))
