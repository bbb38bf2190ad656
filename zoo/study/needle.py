"""Passkey retrieval: a number hidden at a chosen depth of filler text, asked for at the end.

The prompt follows the passkey test of Mohtashami & Jaggi (landmark attention), also used by
kvpress's needle-in-a-haystack: an instruction, filler sentences, at `depth` (0 = right after
the instruction, 1 = right before the question) the sentence "The pass key is N. Remember it.
N is the pass key.", more filler, then "What is the pass key? The pass key is". The answer is
N. Pieces are tokenized one at a time and concatenated, so where the needle sits is known in
tokens (`Needle.start`, `Needle.stop`), not guessed from characters.

Scoring is teacher-forced and exact: the prompt goes through the cache in chunks, then the
answer's tokens in one more forward; the answer counts as retrieved when the model's most likely
token is the right one at every answer position (that is what greedy decoding would emit), and
its mean log-probability is kept as a graded score for models that never get it right.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class Needle:
    """One passkey prompt: `tokens` end just before the answer."""

    tokens: list[int]
    answer: list[int]  # the passkey's tokens as they follow the question
    passkey: str
    start: int  # the needle sentence is tokens[start:stop]
    stop: int
    depth: float  # requested depth in [0, 1]
    filler_before: int  # filler tokens between the instruction and the needle
    filler_after: int

    @property
    def context(self) -> int:
        """Prompt plus answer tokens: the positions the test needs."""
        return len(self.tokens) + len(self.answer)


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Encode a piece that follows other text: byte-level BPE needs the separating space in the
    text; SentencePiece-style tokenizers put it in front of every encoded text themselves."""
    keep = getattr(tokenizer, "leading_space", "keep") == "keep"
    return lambda text: tokenizer.encode((" " + text) if keep else text, add_bos=False)


def make_needle(tokenizer: Any, context: int, depth: float, passkey: str, *,
                filler: str = FILLER) -> Needle:
    """A passkey prompt of exactly `context` tokens (prompt + answer), the needle at `depth` of
    the filler (rounded to a whole filler sentence where one fits). ValueError when `context`
    cannot hold the instruction, needle, question and answer."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1] (fraction of the filler before it), got {depth!r}")
    if not passkey.isdigit():
        raise ValueError(f"the passkey must be digits, got {passkey!r}")
    encode = _encoder(tokenizer)
    head = tokenizer.encode(INSTRUCTION)  # with BOS where the tokenizer adds one
    needle = encode(NEEDLE.format(key=passkey))
    question = encode(QUESTION)
    answer = encode(passkey)
    sentences = [encode(s.strip() + ".") for s in filler.split(".") if s.strip()]
    if not sentences:
        raise ValueError("the filler text has no sentences")
    budget = context - len(head) - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(f"a needle prompt needs at least {context - budget} tokens with this "
                         f"tokenizer; context {context} is too short")
    stream: list[int] = []
    bounds = [0]  # token offsets where a filler sentence starts
    while len(stream) < budget:
        stream += sentences[(len(bounds) - 1) % len(sentences)]
        bounds.append(len(stream))
    before = min(bounds, key=lambda b: (abs(b - depth * budget), b))  # nearest sentence start
    before = min(before, budget)
    after = budget - before
    tokens = head + stream[:before] + needle + stream[before : before + after] + question
    start = len(head) + before
    return Needle(tokens, answer, passkey, start, start + len(needle), depth, before, after)


def random_passkey(rng: random.Random, digits: int = 5) -> str:
    """A passkey of `digits` digits, not starting with 0."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def score(model: Any, cache: list, needle: Needle, *, chunk: int = 256) -> dict[str, Any]:
    """Teacher-force the prompt and the answer through `cache` (fresh): whether every answer
    token is the model's most likely one, and the answer's mean log-probability."""
    tokens = mx.array(needle.tokens + needle.answer[:-1], dtype=mx.int32)
    n_prompt = len(needle.tokens) - 1  # fed before the forward that predicts the answer
    for start in range(0, n_prompt, chunk):
        model(tokens[None, start : min(start + chunk, n_prompt)], cache, check_tokens=False)
        mx.eval([c.state for c in cache])
    logits = model(tokens[None, n_prompt:], cache, check_tokens=False)[0].astype(mx.float32)  # [A, V]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    answer = mx.array(needle.answer, dtype=mx.int32)
    chosen = mx.take_along_axis(logprobs, answer[:, None], axis=-1)[:, 0]
    hit = mx.all(mx.argmax(logprobs, axis=-1) == answer)
    mx.eval(chosen, hit)
    return {"retrieved": bool(hit.item()), "answer_logprob": float(np.mean(np.array(chosen)))}


def needle_grid(model: Any, tokenizer: Any, make_cache: Callable[[], list], contexts: Sequence[int],
                depths: Sequence[float], *, trials: int = 2, seed: int = 0, chunk: int = 256,
                filler: str = FILLER, max_positions: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Accuracy and mean answer log-probability for every context length x depth, over
    `trials` passkeys each (the same passkeys for every cache: they depend on `seed` only).
    Contexts past `max_positions` (a learned position table) or too short for the prompt's
    fixed parts are skipped and listed."""
    cells, skipped = [], []
    for context in contexts:
        if max_positions is not None and context > max_positions:
            skipped.append({"context": context, "reason": f"past the model's {max_positions} positions"})
            continue
        for depth in depths:
            rng = random.Random(f"{seed}-{context}-{depth}")
            results = []
            try:
                needles = [make_needle(tokenizer, context, depth, random_passkey(rng), filler=filler)
                           for _ in range(trials)]
            except ValueError as error:  # too short for the instruction, needle and question
                skipped.append({"context": context, "depth": depth, "reason": str(error)})
                continue
            for needle in needles:
                results.append(score(model, make_cache(), needle, chunk=chunk))
                if progress:
                    progress(needle.context)
            cells.append({
                "context": context, "depth": depth, "trials": trials,
                "accuracy": sum(r["retrieved"] for r in results) / trials,
                "answer_logprob": float(np.mean([r["answer_logprob"] for r in results])),
            })
    return {"cells": cells, "skipped": skipped}
