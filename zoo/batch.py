"""Batched decoding of ragged prompts: many rows at once, each row equal to that prompt alone.

    decoder = BatchDecoder(model, [[1, 2, 3], [4, 5]], cache="rotating", cache_options=...)
    for row, token, logprobs in decoder.run(max_tokens=[50, 20]):
        ...                                  # decoder.finish(row) ends a row early (EOS, stop)

Prompts of different lengths are left-padded to one length; each cache is told which slots of
each row are padding (`Cache.prepare_rows`), the model computes each row's own positions at its
top, and attention never reads padding (caches/base.py, "Rows"). So every row's logits are
the ones that prompt gets alone, for every cache that declares `ragged=True`.

The loop is the canonical one (zoo/generate.py) with a batch dimension: prefill in chunks,
then one token per row per forward, the next step's graph built while the current one is
evaluated (`mx.async_eval`). Rows finish independently (their own `max_tokens`, or
`finish(row)` from the caller); a finished row is no longer sampled or yielded, and is dropped
from the caches (`Cache.select_rows`) so it stops costing work.

Sampling is per row: each row has its own sampler (a seeded sampler has its own random key,
so its draws do not depend on the other rows) and its own logits processors, which see that
row's own history (its prompt and its generated tokens, never padding).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx

from caches import Cache
from sampling import Sampler, greedy_sample

from . import validation
from .generate import CacheSpec, make_cache, prompt_array
from .model import CausalLM


def is_batch(prompt_tokens: Any) -> bool:
    """True when `prompt_tokens` is a batch of prompts: a list/tuple of token lists or arrays,
    or a 2-d array [B, L]."""
    if isinstance(prompt_tokens, mx.array):
        return prompt_tokens.ndim == 2
    return isinstance(prompt_tokens, (list, tuple)) and len(prompt_tokens) > 0 and all(
        isinstance(p, (list, tuple)) or (isinstance(p, mx.array) and p.ndim == 1) for p in prompt_tokens)


def _per_row(value: Any, n: int, what: str) -> list:
    """A per-row list: `value` itself if it is a list/tuple of n, else n copies of it."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} prompts: give one value, or one per prompt")
        return list(value)
    return [value] * n


class BatchDecoder:
    """Prefill a ragged batch left-padded into one set of caches, then decode it row by row.

    prompts: token id lists (each non-empty, ids inside the vocabulary).
    cache / cache_options: as zoo.generate_step (a registry name, or a list of empty caches).
    samplers: one sampler for every row (applied to the whole batch at once), or one per row.
    logits_processors: processors for every row, or one list per row; each sees its row's
    history [N] and logits [1, V].
    vocab_size: the tokenizer's vocabulary where the embedding is padded past it.
    pad_token: the id written into padding slots (never attended: any id gives the same output).

    `add(prompts, ...)` queues more prompts while `run` is going (continuous batching): they are
    prefilled on their own and join the running batch (`Cache.extend_rows`) at the next step.
    """

    def __init__(
        self,
        model: CausalLM,
        prompts: Sequence[Any],
        *,
        cache: CacheSpec = None,
        cache_options: Optional[dict] = None,
        samplers: Union[Sampler, Sequence[Sampler], None] = None,
        logits_processors: Optional[Sequence[Any]] = None,
        prefill_step: int = 512,
        vocab_size: Optional[int] = None,
        pad_token: int = 0,
    ) -> None:
        if isinstance(prompts, mx.array):
            prompts = [row for row in prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("a batch needs at least one prompt (a list of token id lists)")
        if not isinstance(prefill_step, int) or isinstance(prefill_step, bool) or prefill_step < 1:
            raise ValueError(f"prefill_step must be an int >= 1, got {prefill_step!r}")
        model_vocab = model.config.vocab_size
        if vocab_size is not None and not 1 <= vocab_size <= model_vocab:
            raise ValueError(f"vocab_size must be in [1, {model_vocab}] (the model's), got {vocab_size}")
        if not isinstance(pad_token, int) or not 0 <= pad_token < model_vocab:
            raise ValueError(f"pad_token must be a token id in [0, {model_vocab}), got {pad_token!r}")
        self.model = model
        self.prefill_step = prefill_step
        self.pad_token = pad_token
        self.cache_spec = (cache, cache_options) if cache is None or isinstance(cache, str) else None
        prompts = [prompt_array(model, p) for p in prompts]  # each validated, int32 [L]
        self.caches: list[Cache] = make_cache(model, cache, cache_options)
        held = [c.offset for c in self.caches if c.offset or c.rows is not None]
        if held:
            raise ValueError("batched generation starts from empty caches (these already hold tokens)")
        width = max(p.size for p in prompts)
        self.padding = [width - p.size for p in prompts]  # the first batch's left padding
        for c in self.caches:
            c.prepare_rows(self.padding)  # refuses a cache that cannot serve ragged rows
        self.prompts: list[mx.array] = []
        self.lengths: list[int] = []
        self.samplers: list[Sampler] = []
        self.processors: list[list] = []
        self.history: list[mx.array] = []  # each row's own tokens, for its processors
        self.limits: list[int] = []
        self.counts: list[int] = []
        self.shared_sampler: Optional[Sampler] = None
        self._register(prompts, samplers, logits_processors, None)
        self.vocab_mask = None
        if vocab_size is not None and vocab_size < model_vocab:
            self.vocab_mask = mx.where(mx.arange(model_vocab) < vocab_size, 0.0, -float("inf"))
        self.rows = list(range(len(prompts)))  # cache row i holds prompt self.rows[i]
        self.finished: set[int] = set()
        self.can_select = True
        self._queue: list[int] = []  # prompts added, waiting to join

    def _register(self, prompts: list[mx.array], samplers: Any, logits_processors: Any,
                  max_tokens: Any) -> list[int]:
        """Give `prompts` row ids and their per-row sampling state."""
        n, first = len(prompts), len(self.prompts)
        if samplers is None or callable(samplers):
            row_samplers = [samplers or greedy_sample] * n
        else:
            row_samplers = _per_row(samplers, n, "samplers")
        everyone = self.samplers + row_samplers
        self.shared_sampler = everyone[0] if all(s is everyone[0] for s in everyone) else None
        processors = list(logits_processors or [])
        if processors and all(isinstance(p, (list, tuple)) for p in processors):
            row_processors = [list(p) for p in _per_row(processors, n, "logits_processors")]
        else:
            row_processors = [processors] * n
        limits = _per_row(max_tokens, n, "max_tokens") if max_tokens is not None else [None] * n
        for m in limits:
            if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
                raise ValueError(f"max_tokens must be ints >= 0, got {m!r}")
        self.prompts += prompts
        self.lengths += [p.size for p in prompts]
        self.samplers += row_samplers
        self.processors += row_processors
        self.history += list(prompts)
        self.limits += limits
        self.counts += [0] * n
        return list(range(first, first + n))

    # -- the steps -------------------------------------------------------------------------

    def _prefill(self, caches: list[Cache], prompts: list[mx.array], padding: list[int]) -> mx.array:
        """Run all but each row's last prompt token through `caches`; return the last tokens
        int32 [B] (left padding aligns them in the last column)."""
        width = max(p.size for p in prompts)
        padded = mx.array([[self.pad_token] * pad + p.tolist() for pad, p in zip(padding, prompts)],
                          dtype=mx.int32)  # [B, width]
        start = 0
        while width - start > 1:
            n = min(self.prefill_step, width - 1 - start)
            self.model(padded[:, start : start + n], caches, check_tokens=False)
            mx.eval([c.state for c in caches])
            start += n
        return padded[:, -1]

    def prefill(self) -> mx.array:
        """Prefill the first batch (all but each row's last token); its last tokens [B]."""
        return self._prefill(self.caches, [self.prompts[r] for r in self.rows], self.padding)

    def step(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """Feed one token per cache row (int32 [B']); return the sampled tokens [B'] and the
        log-probabilities [B', V] they were drawn from (lazy: nothing is evaluated here)."""
        logits = self.model(tokens[:, None], self.caches, check_tokens=False)[:, -1, :]  # [B', V]
        if self.vocab_mask is not None:
            logits = logits + self.vocab_mask
        if any(self.processors[r] for r in self.rows):
            rows = []
            for i, r in enumerate(self.rows):
                row = logits[i : i + 1]
                for process in self.processors[r]:
                    row = validation.checked_logits(process(self.history[r], row), process, row.shape)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.shared_sampler is not None:
            sampled = _checked_rows(self.shared_sampler(logprobs), self.shared_sampler, logprobs.shape)
        else:
            sampled = mx.concatenate([_checked_rows(self.samplers[r](logprobs[i : i + 1]), self.samplers[r],
                                                    (1, logprobs.shape[1])) for i, r in enumerate(self.rows)])
        sampled = sampled.astype(mx.int32)
        for i, r in enumerate(self.rows):
            if self.processors[r]:
                self.history[r] = mx.concatenate([self.history[r], sampled[i : i + 1]])
        return sampled, logprobs

    def finish(self, row: int) -> None:
        """End prompt `row` (its index in the prompts): it is no longer sampled or yielded."""
        self.finished.add(row)

    def add(self, prompts: Sequence[Any], *, max_tokens: Union[int, Sequence[int]] = 256,
            samplers: Union[Sampler, Sequence[Sampler], None] = None,
            logits_processors: Optional[Sequence[Any]] = None) -> list[int]:
        """Queue more prompts to join the running batch at the next step (continuous batching);
        returns their row ids. Each is prefilled on its own and then decodes exactly as it would
        alone. Needs the cache given by name and a strategy with `_extend_rows`."""
        if self.cache_spec is None:
            raise ValueError("adding prompts to a running batch needs the cache given by name (it builds "
                             "caches for them), not a list of caches")
        if type(self.caches[0])._extend_rows is Cache._extend_rows:
            raise ValueError(f"cache {type(self.caches[0]).name or type(self.caches[0]).__name__!r} cannot "
                             f"take rows into a running batch (no _extend_rows); run the prompts as "
                             f"another batch")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("add needs a non-empty list of prompts (token id lists)")
        arrays = [prompt_array(self.model, p) for p in prompts]
        ids = self._register(arrays, samplers, logits_processors, max_tokens)
        self._queue += ids
        return ids

    def _admit(self, pending: Optional[list[mx.array]]) -> tuple[Optional[list[mx.array]], set[int]]:
        """Prefill the queued prompts in caches of their own and join them to the batch; return
        the pending (tokens, logprobs) with their rows appended (their last prompt tokens, to be
        fed next, and placeholder log-probabilities) and the joined rows."""
        ids, self._queue = self._queue, []
        for r in ids:
            if self.limits[r] == 0:
                self.finish(r)
        ids = [r for r in ids if r not in self.finished]
        if not ids:
            return pending, set()
        prompts = [self.prompts[r] for r in ids]
        width = max(p.size for p in prompts)
        padding = [width - p.size for p in prompts]
        cache, options = self.cache_spec
        joining = make_cache(self.model, cache, options)
        for c in joining:
            c.prepare_rows(padding)
        last = self._prefill(joining, prompts, padding)
        placeholder = mx.zeros((len(ids), self.model.config.vocab_size), dtype=mx.float32)
        if pending is None or all(r in self.finished for r in self.rows):  # nothing left running
            self.caches, self.rows = joining, ids
            return [last, placeholder], set(ids)
        for c, new in zip(self.caches, joining):
            c.extend_rows(new)
        self.rows = self.rows + ids
        tokens, logprobs = pending
        return [mx.concatenate([tokens, last]), mx.concatenate([logprobs, placeholder.astype(logprobs.dtype)])], set(ids)

    def _drop_finished(self, pending: list[mx.array]) -> list[mx.array]:
        """Drop finished rows from the caches and from `pending` (arrays with a row axis)."""
        keep = [i for i, r in enumerate(self.rows) if r not in self.finished]
        if len(keep) == len(self.rows) or not keep or not self.can_select:
            return pending
        try:
            for c in self.caches:
                c.select_rows(keep)
        except NotImplementedError:  # the cache keeps them: they only stop being sampled
            self.can_select = False
            return pending
        index = mx.array(keep, dtype=mx.int32)
        self.rows = [self.rows[i] for i in keep]
        return [a[index] for a in pending]

    def run(self, max_tokens: Union[int, Sequence[int]] = 256) -> Iterator[tuple[int, int, mx.array]]:
        """Yield (row, token, logprobs [V]) for every generated token, in step order, row
        order within a step. `max_tokens`: for every first-batch row, or one per row (rows
        `add`ed later bring their own)."""
        first = [r for r in self.rows]
        for r, m in zip(first, _per_row(max_tokens, len(first), "max_tokens")):
            if not isinstance(m, int) or isinstance(m, bool) or m < 0:
                raise ValueError(f"max_tokens must be ints >= 0, got {m!r}")
            self.limits[r] = m
            if m == 0:
                self.finish(r)
        token = self.prefill()
        pending: Optional[list[mx.array]] = None
        fresh: set[int] = set()  # rows whose pending token is their prompt's last: fed, not yielded
        if len(self.finished) < len(first):
            token = self._drop_finished([token])[0]
            pending = list(self.step(token))
            mx.async_eval(*pending)
        if self._queue:
            pending, fresh = self._admit(pending)
        while pending is not None:
            token, logprobs = pending
            active = [r for r in self.rows if r not in self.finished]
            more = any(r in fresh or self.counts[r] + 1 < self.limits[r] for r in active)
            cannot_continue, pending = None, None
            if more:
                try:
                    pending = list(self.step(token))  # built while `token` evaluates
                    mx.async_eval(*pending)
                except ValueError as error:  # e.g. past a learned position table
                    cannot_continue = error
            values = token.tolist()
            for i, r in enumerate(list(self.rows)):
                if r in self.finished or r in fresh:
                    continue
                self.counts[r] += 1
                if self.counts[r] >= self.limits[r]:
                    self.finish(r)
                yield r, values[i], logprobs[i]
            if cannot_continue is not None:
                raise cannot_continue
            fresh = set()
            if pending is not None:
                pending = self._drop_finished(pending)
            if self._queue:
                pending, fresh = self._admit(pending)

    # -- what it holds ---------------------------------------------------------------------

    def cache_bytes(self) -> int:
        """Bytes all layers' caches hold now (every row in the batch, padding included)."""
        return sum(c.nbytes for c in self.caches)


def batch_generate_step(model: CausalLM, prompts: Sequence[Any], *, max_tokens: int = 256,
                        **options: Any) -> Iterator[tuple[list[int], mx.array]]:
    """zoo.generate_step for a batch: yield (tokens [B] as ints, logprobs [B, V]) per step.

    Every row runs `max_tokens` steps (ending rows early on EOS or stop strings is
    `zoo.batch_generate`'s job); options are BatchDecoder's (a `sampler` is every row's, or a
    list of one per row).
    """
    if "sampler" in options:
        options["samplers"] = options.pop("sampler")
    decoder = BatchDecoder(model, prompts, **options)
    step: list[int] = []
    rows: list[mx.array] = []
    for row, token, logprobs in decoder.run(max_tokens):
        step.append(token)
        rows.append(logprobs)
        if row == len(decoder.prompts) - 1:  # every row runs max_tokens steps: rows stay in order
            yield step, mx.stack(rows)
            step, rows = [], []


def _checked_rows(tokens: Any, sampler: Any, shape: tuple) -> mx.array:
    """A sampler's tokens for `shape[0]` rows: an int mx.array [rows], every id inside the
    vocabulary. A sampler not from the sampling package is checked by value (one synchronisation
    per step): an id outside the vocabulary would crash MLX's embedding gather on the next step."""
    rows, vocab = shape
    if not isinstance(tokens, mx.array) or tokens.size != rows or not mx.issubdtype(tokens.dtype, mx.integer):
        got = type(tokens).__name__ if not isinstance(tokens, mx.array) else f"{tokens.dtype} {list(tokens.shape)}"
        raise (ValueError if isinstance(tokens, mx.array) and tokens.size != rows else TypeError)(
            f"sampler {validation.describe(sampler)} returned {got}; for {rows} row(s) it must return "
            f"{rows} integer token id(s)")
    tokens = tokens.reshape(rows)
    if not validation.trusted(sampler):
        low, high = mx.min(tokens).item(), mx.max(tokens).item()
        if low < 0 or high >= vocab:
            raise ValueError(f"sampler {validation.describe(sampler)} returned token id "
                             f"{low if low < 0 else high}, outside the vocabulary (ids must be in [0, {vocab}))")
    return tokens
