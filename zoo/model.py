"""The top of every model: validate the input and compute positions once, from the cache.

This is the only place positions are made. They come from the cache's offset (how many tokens
came before), never from the shape of the current input, and flow down through `Context`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from caches import EXACT, Cache, Reference
from positional import Positional

from . import fingerprint, ownership
from .layers import Context
from .validation import check_in_step
from .config import ModelConfig


class CausalLM(nn.Module):
    """Base class of the families: `model(tokens, cache=None)` -> logits [B, L, V].

    Subclasses set `self.positional` and `self.layers` and implement `forward`.
    """

    config: ModelConfig
    positional: Positional

    # What a family file (zoo/families/) provides for checkpoints, all optional:
    # hf_model_types (HF config.json model_type values it reads), config_from_hf(hf) ->
    # ModelConfig, hf_config(cfg) -> dict, hf_layout(cfg, file_names) -> CheckpointLayout,
    # mlx_lm_config(cfg) -> dict and mlx_lm_name(name) -> str for mlx-lm's twin.
    hf_model_types: tuple[str, ...] = ()

    def __call__(
        self,
        tokens: mx.array,
        cache: Optional[Sequence[Cache]] = None,
        *,
        reference: Optional[Reference] = None,
        check_tokens: bool = True,
    ) -> mx.array:
        """Logits [B, L, vocab_size] for int tokens [B, L].

        With `cache` (one per layer, as from `caches.make`) the tokens continue the cached
        sequence and the cache is updated in place. Without it, the forward is uncached from
        position 0, and `reference` (a cache's declared `Reference`) makes it the oracle for
        that cache. `check_tokens=False` skips the vocabulary range check, which forces an
        evaluation; the generation loop uses it for tokens it sampled itself.
        """
        if not isinstance(tokens, mx.array):
            raise TypeError(f"tokens must be an mx.array of int32 [B, L], got {type(tokens).__name__}")
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape [B, L] with L >= 1, got {tokens.shape}")
        if not mx.issubdtype(tokens.dtype, mx.integer):
            raise TypeError(f"tokens must be integer token ids, got {tokens.dtype}")
        if cache is not None:
            if reference is not None:
                raise ValueError("pass either a cache or a reference, not both: the reference "
                                 "describes the uncached oracle; a cache carries its own")
            if len(cache) != len(self.layers):
                raise ValueError(
                    f"cache has {len(cache)} entries but the model has {len(self.layers)} layers; "
                    f"build it with caches.make(name, model)"
                )
        if not cache:
            return self._forward(tokens, 0, None, reference, check_tokens)
        record = ownership.claim(cache, "model forward")  # one thread per cache list
        try:
            offset = check_in_step(cache)  # every layer holds the same tokens
            fingerprint.check(cache, self)  # ... and they were computed by this model
            return self._forward(tokens, offset, cache, reference, check_tokens)
        finally:
            ownership.release(record)

    def _forward(self, tokens: mx.array, offset: int, cache: Optional[Sequence[Cache]],
                 reference: Optional[Reference], check_tokens: bool) -> mx.array:
        length = tokens.shape[1]
        padding = cache[0].padding if cache else None  # ragged rows: int32 [B] left padding
        if padding is not None and tokens.shape[0] != padding.shape[0]:
            raise ValueError(f"the cache holds {padding.shape[0]} rows, tokens have B={tokens.shape[0]}")
        self.positional.check_positions(offset - min(cache[0].row_padding) if padding is not None else offset, length)
        if check_tokens:
            check_token_range(tokens, self.config.vocab_size)
        positions = mx.arange(offset, offset + length, dtype=mx.int32)  # the only arange of positions
        if padding is not None:
            positions = positions - padding[:, None]  # [B, L]: each row's own; padding negative
        ctx = Context(positions, self.positional, reference or EXACT, window=self.config.sliding_window,
                      training=self.training and not cache)
        return self.forward(tokens, ctx, cache or [None] * len(self.layers))

    def update(self, parameters: dict, *args, **kwargs) -> "CausalLM":
        """nn.Module.update; the weights change, so the model's fingerprint is recomputed."""
        fingerprint.forget(self)
        return super().update(parameters, *args, **kwargs)

    def update_modules(self, modules: dict, *args, **kwargs) -> "CausalLM":
        fingerprint.forget(self)
        return super().update_modules(modules, *args, **kwargs)

    def forward(self, tokens: mx.array, ctx: Context, cache: Sequence[Optional[Cache]]) -> mx.array:
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        """Number of parameters."""
        from mlx.utils import tree_flatten

        return sum(v.size for _, v in tree_flatten(self.parameters()))


def check_token_range(tokens: mx.array, vocab_size: int) -> None:
    """Raise ValueError if any token id is outside [0, vocab_size)."""
    low, high = mx.min(tokens).item(), mx.max(tokens).item()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary: ids must be in [0, {vocab_size})")
