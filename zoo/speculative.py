"""Speculative decoding: draft tokens cheaply, verify them in one forward, keep what the model
itself would have produced.

    for token, logprobs in zoo.generate_step(model, prompt, draft=small_model, num_draft=4): ...
    for token, logprobs in zoo.generate_step(model, prompt, prompt_lookup=3): ...

Each round, a drafter proposes up to k tokens d1..dk after the last token t: a smaller draft
model sharing the tokenizer (greedy or sampled from its own distribution), or prompt lookup (the
tokens that followed the most recent earlier occurrence of the last n tokens in the prompt and
the generated text). The model then runs one cached forward over [t, d1, .., dk], which gives
the logits plain decoding would have computed after each of them (a cached forward of k+1
tokens equals k+1 forwards of one: the property test's claim). The accepted drafts and one more
token (the model's own choice where the first draft was rejected, or after the last) are
emitted, and the cache is rolled back with `trim` over the rejected drafts.

- Greedy: a draft is accepted when it is the model's argmax there, so the output is plain greedy
  decoding's, token for token, with the same cache (tests/test_speculative.py).
- Sampling: the rejection rule of Leviathan et al. and Chen et al. (2023): accept draft d with
  probability min(1, p(d) / q(d)), else draw from max(p - q, 0) renormalised; after k accepted
  drafts draw from p. p is the sampler's own distribution (filters, then temperature) and q the
  drafter's, so the tokens are distributed as plain sampling's. This needs the distribution a
  sampler draws from: samplers made by `sampling.make_sampler` carry it; an opaque sampler
  function is refused (greedy works with any).
- Adaptive drafting: k starts at `num_draft`, shrinks after rejections and grows after full
  acceptance; after rounds where every draft missed, the loop decodes plainly (pipelined, as
  zoo.generate_step) for 2, 4, .. 32 tokens before it drafts again, so text where drafts miss
  costs about what plain decoding costs.
- Caches: rolling back needs `trim`. A cache that cannot stay trimmable for the whole run (a
  rotating window that would wrap, eviction caches) is refused before anything runs, with the
  reason (`Cache.trim_horizon`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx

from caches import Cache

from . import validation
from .model import CausalLM


@dataclass
class SpeculativeStats:
    """What speculation did: rounds, drafted and accepted tokens, emitted tokens."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_lengths: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


# -- drafters --------------------------------------------------------------------------------


class PromptLookup:
    """Proposes the tokens that followed an earlier occurrence of the last n tokens (n =
    `ngram` down to 2; 1 only when ngram is 1: single tokens match too often by chance) in the
    prompt and the generated text: the most recent occurrence when k
    tokens follow it, else the first (the longest continuation). Deterministic: its draft
    distribution is a point mass on each proposal. The n-grams are indexed as the text grows,
    so a round costs O(ngram), not O(text)."""

    def __init__(self, ngram: int) -> None:
        if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 1:
            raise ValueError(f"prompt_lookup must be an int >= 1 (the n-gram size to match), got {ngram!r}")
        self.ngram = ngram
        # size n -> n-gram -> [end of its first occurrence, end of its latest], ends < len(text)
        self._index: list[dict[tuple, list[int]]] = [dict() for _ in range(ngram + 1)]
        self._seen = 1

    def _catch_up(self, history: list[int]) -> None:
        """Index every n-gram that has a token after it (ends before the last token)."""
        for end in range(self._seen, len(history)):  # the n-gram history[end - n : end]
            for n in range(1, min(self.ngram, end) + 1):
                ends = self._index[n].setdefault(tuple(history[end - n:end]), [end, end])
                ends[1] = end
        self._seen = max(self._seen, len(history))

    def propose(self, history: list[int], k: int) -> tuple[list[int], None]:
        self._catch_up(history)
        for n in range(min(self.ngram, len(history)), min(2, self.ngram) - 1, -1):  # 1-grams only if asked
            ends = self._index[n].get(tuple(history[-n:]))
            if ends is not None:
                first, latest = ends
                end = latest if len(history) - latest >= k else first
                return history[end:end + k], None
        return [], None


class DraftModel:
    """Proposes k tokens by running a smaller model with its own cache, greedily (or sampled
    from `distribution` when given, returning its probabilities as q)."""

    def __init__(self, model: CausalLM, cache: Sequence[Cache], width: int, vocab: int,
                 distribution: Optional[Callable[[mx.array], mx.array]], key: Optional[mx.array]) -> None:
        self.model, self.cache = model, list(cache)
        self.distribution, self.key = distribution, key
        self.fed: list[int] = []  # the tokens in the draft cache
        # The draft's logits on the target's width: ids past the shared vocabulary impossible.
        self.width = width
        self.valid = mx.where(mx.arange(width) < vocab, 0.0, -float("inf"))

    def _logits(self, tokens: list[int]) -> mx.array:
        out = self.model(mx.array([tokens], dtype=mx.int32), self.cache, check_tokens=False)[0, -1]
        self.fed += tokens
        if out.shape[0] < self.width:
            out = mx.concatenate([out, mx.full((self.width - out.shape[0],), -float("inf"), out.dtype)])
        return out[: self.width] + self.valid  # [V]

    def propose(self, history: list[int], k: int) -> tuple[list[int], Optional[mx.array]]:
        common = 0
        while common < min(len(self.fed), len(history) - 1) and self.fed[common] == history[common]:
            common += 1
        self._trim(len(self.fed) - common)
        logits = self._logits(history[common:])
        drafts, probs = [], []
        for i in range(k):
            if self.distribution is None:
                token = int(mx.argmax(logits).item())
            else:
                q = self.distribution((logits - mx.logsumexp(logits))[None])[0]
                self.key, sub = mx.random.split(self.key)
                token = int(mx.random.categorical(mx.log(q), key=sub).item())
                probs.append(q)
            drafts.append(token)
            if i + 1 < k:
                logits = self._logits([token])
        return drafts, (mx.stack(probs) if probs else None)

    def _trim(self, n: int) -> None:
        if n:
            for c in self.cache:
                c.trim(n)
            del self.fed[len(self.fed) - n:]


# -- the loop --------------------------------------------------------------------------------


def check_trimmable(layer_caches: Sequence[Cache], needed: int, what: str) -> None:
    """Refuse, before anything runs, a cache that cannot be trimmed up to `needed` tokens."""
    horizon = layer_caches[0].trim_horizon()
    if horizon is not None and horizon < needed:
        name = type(layer_caches[0]).__name__
        reason = ("it cannot be trimmed at all" if horizon <= 0 else
                  f"it stays trimmable only up to {horizon} tokens")
        raise ValueError(
            f"speculative decoding rolls back rejected drafts with trim, but the {what} cache "
            f"({name}) would hold up to {needed} tokens and {reason}; use a cache that can trim "
            f"for the whole run (concat, preallocated, quantized, or a larger rotating window)")


def speculative_step(
    model: CausalLM,
    prompt: mx.array,
    layer_caches: list[Cache],
    *,
    draft: Optional[CausalLM] = None,
    draft_cache: Any = None,
    prompt_lookup: Optional[int] = None,
    num_draft: int = 4,
    adaptive: bool = True,
    sampler: Optional[Callable] = None,
    logits_processors: Sequence[Callable] = (),
    max_tokens: int = 256,
    prefill_step: int = 512,
    padding: Optional[mx.array] = None,
    vocab: int,
    stats: Optional[SpeculativeStats] = None,
) -> Iterator[tuple[int, mx.array]]:
    """The speculative generation loop (see the module docstring); yields (token, logprobs [V]).

    `prompt` is validated int32 [L]; `layer_caches` the model's caches. Called by
    `zoo.generate_step` when it is given `draft` or `prompt_lookup`.
    """
    if (draft is None) == (prompt_lookup is None):
        raise ValueError("speculative decoding needs exactly one drafter: draft=MODEL or prompt_lookup=N")
    if not isinstance(num_draft, int) or isinstance(num_draft, bool) or num_draft < 1:
        raise ValueError(f"num_draft must be an int >= 1 (tokens drafted per round), got {num_draft!r}")
    greedy = sampler is None or getattr(sampler, "greedy", False)
    distribution = None if greedy else getattr(sampler, "distribution", None)
    if not greedy and distribution is None:
        raise ValueError("speculative sampling needs the distribution the sampler draws from: use a "
                         "sampler from sampling.make_sampler (temp, top_p, top_k, min_p), or greedy")
    stats = stats if stats is not None else SpeculativeStats()
    needed = layer_caches[0].offset + prompt.size + max_tokens + num_draft
    check_trimmable(layer_caches, needed, "model's")
    key = draft_key = None
    if not greedy:
        seed = getattr(sampler, "seed", None)
        if seed is None:  # unseeded: from MLX's global random state, as plain sampling draws
            seed = int(mx.random.randint(0, 2**31 - 1, ()).item())
        key, draft_key = mx.random.split(mx.random.key(seed))

    if draft is not None:
        if not isinstance(draft, CausalLM):
            raise TypeError(f"draft must be a zoo model (CausalLM), got {type(draft).__name__}")
        if draft.config.vocab_size < vocab:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) is smaller than "
                             f"the model's ({vocab}); a draft model must share the tokenizer")
        from .generate import make_cache

        dcache = make_cache(draft, draft_cache)
        check_trimmable(dcache, needed, "draft model's")
        drafter: Any = DraftModel(draft, dcache, model.config.vocab_size, vocab, distribution, draft_key)
    else:
        drafter = PromptLookup(prompt_lookup)

    history = [int(t) for t in prompt.tolist()]
    if len(history) > 1:  # prefill all but the last prompt token, as plain decoding does
        for start in range(0, len(history) - 1, prefill_step):
            model(prompt[start:min(start + prefill_step, len(history) - 1)][None], layer_caches, check_tokens=False)
            mx.eval([c.state for c in layer_caches])

    def processed(logits: mx.array, drafts: list[int]) -> mx.array:
        """Logits [k+1, V] after padding and processors, each row with its own history."""
        if padding is not None:
            logits = logits + padding
        if not logits_processors:
            return logits
        rows = []
        for i in range(logits.shape[0]):
            row = logits[i:i + 1]
            seen = mx.array(history + drafts[:i], dtype=mx.int32)
            for process in logits_processors:
                row = validation.checked_logits(process(seen, row), process, row.shape)
            rows.append(row)
        return mx.concatenate(rows, axis=0)

    def verify(raw: mx.array, logits: mx.array, fed: int) -> None:
        """Finite model logits, and at least one token possible after the processors (one
        synchronous check per round: a round reads its tokens right away anyway); on failure
        the round's tokens are taken back out of the cache."""
        verdict = validation.Verdict(raw)
        if logits_processors:
            verdict.processed(logits, tuple(logits_processors))
        verdict.finite(mx.logsumexp(logits, axis=-1))
        problem = verdict.problem(verdict.array())
        if problem is not None:
            validation.rollback(layer_caches, fed)
            raise ValueError(problem)

    def plain(n: int) -> Iterator[tuple[int, mx.array]]:
        """n tokens of plain decoding, pipelined as zoo.generate_step's (step i+1's graph is
        built while step i evaluates); the last token is not fed, as after a round."""
        def step(token: mx.array) -> tuple[mx.array, mx.array, validation.Verdict, mx.array]:
            raw = model(token[None], layer_caches, check_tokens=False)[0]
            verdict = validation.Verdict(raw)
            logits = processed(raw, [])
            if logits_processors:
                verdict.processed(logits, tuple(logits_processors))
            lse = mx.logsumexp(logits, axis=-1, keepdims=True)
            logprobs = logits - lse
            token = verdict.sampled(validation.checked_token(draw(logprobs), draw), draw, vocab, lse)
            return token, logprobs[0], verdict, verdict.array()

        token, logprobs, verdict, flags = step(mx.array(history[-1:], dtype=mx.int32))
        mx.async_eval(token, logprobs, flags)
        for i in range(n):
            pipelined = 0
            if i + 1 < n:
                if logits_processors:  # they read the history as ints: wait for this token
                    history.append(token.item())
                next_token, next_logprobs, next_verdict, next_flags = step(token)
                mx.async_eval(next_token, next_logprobs, next_flags)
                pipelined = 1
                if logits_processors:
                    history.pop()
            value = token.item()
            problem = verdict.problem(flags)
            if problem is not None:
                validation.rollback(layer_caches, pipelined)
                raise ValueError(problem)
            yield value, logprobs
            if i + 1 < n:
                token, logprobs, verdict, flags = next_token, next_logprobs, next_verdict, next_flags

    draw = sampler if sampler is not None else (lambda logprobs: mx.argmax(logprobs, axis=-1))
    k_now, emitted, skip, misses = num_draft, 0, 0, 0
    while emitted < max_tokens:
        k = min(k_now, max_tokens - emitted - 1)
        drafts, q = drafter.propose(history, k) if k > 0 and not skip else ([], None)
        drafts = drafts[:k]
        if not drafts:  # nothing to verify: plain decoding, as fast as the plain loop
            n = max(1, min(skip, max_tokens - emitted))
            for token, logprobs in plain(n):
                history.append(token)
                emitted += 1
                stats.emitted += 1
                stats.rounds += 1
                yield token, logprobs
            skip = 0
            continue
        fed = [history[-1]] + drafts
        raw = model(mx.array([fed], dtype=mx.int32), layer_caches, check_tokens=False)[0]  # [k+1, V]
        logits = processed(raw, drafts)
        verify(raw, logits, len(fed))
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if greedy:
            choice = mx.argmax(logprobs, axis=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and choice[accepted] == drafts[accepted]:
                accepted += 1
            tokens = drafts[:accepted] + [choice[accepted]]
        else:
            key, tokens, accepted = _accept_sampled(key, distribution(logprobs), drafts, q)
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.draft_lengths.append(len(drafts))
        rejected = len(drafts) - accepted
        if rejected:
            for c in layer_caches:
                c.trim(rejected)
        for i, token in enumerate(tokens):
            history.append(token)
            emitted += 1
            stats.emitted += 1
            yield token, logprobs[i]
        if adaptive:  # longer drafts while they are accepted; plain decoding while they miss
            k_now = min(num_draft, k_now + 1) if accepted == len(drafts) else max(1, (k_now + accepted) // 2)
            misses = misses + 1 if accepted == 0 else 0
            skip = min(2 ** misses, 32) if misses else 0


def _accept_sampled(key, p: mx.array, drafts: list[int], q: Optional[mx.array]):
    """The rejection rule over the drafts: (key, emitted tokens, accepted count).

    p [k+1, V]: the target's sampling distribution at each fed position; q [k, V]: the draft's
    (None: point masses on the drafts, as prompt lookup proposes).
    """
    k = len(drafts)
    for i, d in enumerate(drafts):
        key, u_key, r_key = mx.random.split(key, 3)
        pd = p[i, d].item()
        qd = 1.0 if q is None else q[i, d].item()
        if mx.random.uniform(key=u_key).item() * qd < pd:  # accept with probability min(1, p/q)
            continue
        if q is None:
            residual = p[i] * (mx.arange(p.shape[-1]) != d)
        else:
            residual = mx.maximum(p[i] - q[i], 0.0)
        token = int(mx.random.categorical(mx.log(residual / residual.sum()), key=r_key).item())
        return key, drafts[:i] + [token], i
    key, r_key = mx.random.split(key)
    token = int(mx.random.categorical(mx.log(p[k]), key=r_key).item())
    return key, drafts + [token], k
