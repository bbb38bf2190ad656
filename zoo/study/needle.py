"""Passkey retrieval: a number hidden at a chosen depth of filler text, asked for at the end.

The prompt follows the passkey test of Mohtashami & Jaggi (landmark attention), also used by
kvpress's needle-in-a-haystack: an instruction, filler sentences, at `depth` (0 = right after
the instruction, 1 = right before the question) the sentence "The pass key is N. Remember it.
N is the pass key.", more filler, then "What is the pass key? The pass key is". The answer is
N. Pieces are tokenized one at a time and concatenated, so where the needle sits is known in
tokens (`Needle.start`, `Needle.stop`), not guessed from characters.

Scoring is teacher-forced and exact (a cell's trials are the rows of one batch): the prompt goes through the cache in chunks, then the
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


def score_batch(model: Any, cache: list, needles: Sequence[Needle], *, chunk: int = 256) -> list[dict[str, Any]]:
    """Teacher-force prompts and answers through `cache` (fresh), the needles as the rows of one
    batch (they must share prompt and answer lengths): per row, whether every answer token is
    the model's most likely one, and the answer's mean log-probability."""
    lengths = {(len(n.tokens), len(n.answer)) for n in needles}
    if len(lengths) != 1:
        raise ValueError(f"needles in one batch must share prompt and answer lengths, got {sorted(lengths)}")
    tokens = mx.array([n.tokens + n.answer[:-1] for n in needles], dtype=mx.int32)  # [B, P + A - 1]
    n_prompt = len(needles[0].tokens) - 1  # fed before the forward that predicts the answer
    for start in range(0, n_prompt, chunk):
        model(tokens[:, start : min(start + chunk, n_prompt)], cache, check_tokens=False)
        mx.eval([c.state for c in cache])
    logits = model(tokens[:, n_prompt:], cache, check_tokens=False).astype(mx.float32)  # [B, A, V]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    answer = mx.array([n.answer for n in needles], dtype=mx.int32)  # [B, A]
    chosen = mx.take_along_axis(logprobs, answer[..., None], axis=-1)[..., 0]  # [B, A]
    hit = mx.all(mx.argmax(logprobs, axis=-1) == answer, axis=-1)  # [B]
    mx.eval(chosen, hit)
    return [{"retrieved": bool(h), "answer_logprob": float(np.mean(c))}
            for h, c in zip(np.array(hit), np.array(chosen))]


def score(model: Any, cache: list, needle: Needle, *, chunk: int = 256) -> dict[str, Any]:
    """`score_batch` of one needle."""
    return score_batch(model, cache, [needle], chunk=chunk)[0]


def _score_all(model: Any, make_cache: Callable[[], list], needles: list[Needle], chunk: int) -> list[dict]:
    """Needles of equal lengths in one batch each (rows of one forward); a cache that cannot hold a
    batch (B > 1) gets them one at a time."""
    groups: dict[tuple, list[int]] = {}
    for i, needle in enumerate(needles):
        groups.setdefault((len(needle.tokens), len(needle.answer)), []).append(i)
    out: list[Any] = [None] * len(needles)
    for rows in groups.values():
        try:
            results = score_batch(model, make_cache(), [needles[i] for i in rows], chunk=chunk)
        except (ValueError, TypeError):
            if len(rows) == 1:
                raise
            results = [score(model, make_cache(), needles[i], chunk=chunk) for i in rows]
        for i, result in zip(rows, results):
            out[i] = result
    return out


def needle_grid(model: Any, tokenizer: Any, make_cache: Callable[[], list], contexts: Sequence[int],
                depths: Sequence[float], *, trials: int = 2, seed: int = 0, chunk: int = 256,
                filler: str = FILLER, max_positions: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Accuracy and mean answer log-probability for every context length x depth, over
    `trials` passkeys each (the same passkeys for every cache: they depend on `seed` only),
    the trials of a cell evaluated as the rows of one batch where their lengths agree.
    Contexts past `max_positions` (a learned position table) or too short for the prompt's
    fixed parts are skipped and listed."""
    cells, skipped = [], []
    for context in contexts:
        if max_positions is not None and context > max_positions:
            skipped.append({"context": context, "reason": f"past the model's {max_positions} positions"})
            continue
        for depth in depths:
            rng = random.Random(f"{seed}-{context}-{depth}")
            try:
                needles = [make_needle(tokenizer, context, depth, random_passkey(rng), filler=filler)
                           for _ in range(trials)]
            except ValueError as error:  # too short for the instruction, needle and question
                skipped.append({"context": context, "depth": depth, "reason": str(error)})
                continue
            results = _score_all(model, make_cache, needles, chunk)
            if progress:
                progress(sum(needle.context for needle in needles))
            cells.append({
                "context": context, "depth": depth, "trials": trials,
                "accuracy": sum(r["retrieved"] for r in results) / trials,
                "answer_logprob": float(np.mean([r["answer_logprob"] for r in results])),
            })
    return {"cells": cells, "skipped": skipped}
