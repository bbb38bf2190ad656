"""Logits processors: f(tokens so far [N], logits [1, V]) -> logits [1, V].

    processors = sampling.make_logits_processors(repetition_penalty=1.3, logit_bias={50256: -100})
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from .registry import LogitsProcessor, make_processor, register_processor


@register_processor("repetition_penalty")
def repetition_penalty(penalty: float, context_size: Optional[int] = 20) -> LogitsProcessor:
    """CTRL's repetition penalty (Keskar et al. 2019, as in HF transformers and mlx-lm).

    The logit of every token among the last `context_size` tokens (None: all of them, as HF
    does) is divided by `penalty` if positive and multiplied by it if negative, so penalty > 1
    makes a repeat less likely whatever the sign. Unlike mlx-lm's version, the caller's logits
    array is not modified in place.
    """
    if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not math.isfinite(penalty) \
            or penalty <= 0:
        raise ValueError(f"repetition penalty must be a finite number > 0 (1 is off), got {penalty!r}")
    if context_size is not None and (not isinstance(context_size, int) or isinstance(context_size, bool)
                                     or context_size < 1):
        raise ValueError(f"repetition context_size must be None (all tokens) or an int >= 1, got {context_size!r}")

    def penalise(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens if context_size is None else tokens[-context_size:]
        index = mx.broadcast_to(recent.astype(mx.int32), (logits.shape[0], recent.size))  # [B, W]
        chosen = mx.take_along_axis(logits, index, axis=-1)
        chosen = mx.where(chosen < 0, chosen * penalty, chosen / penalty)
        return mx.put_along_axis(logits, index, chosen, axis=-1)  # repeats write the same value

    return penalise


@register_processor("logit_bias")
def logit_bias(bias: dict) -> LogitsProcessor:
    """Add `bias[token]` to each listed token's logit (-inf bans a token). mlx-lm's processor."""
    if not isinstance(bias, dict) or not bias:
        raise ValueError(f"logit_bias must be a non-empty dict {{token id: bias}}, got {bias!r}")
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value == math.inf:
            raise ValueError(f"logit_bias[{token}] must be a number (or -inf to ban it), got {value!r}")
    highest = max(bias)
    from mlx_lm.sample_utils import make_logits_processors as mlx_lm_processors  # lazy: importing mlx_lm loads transformers and torch (seconds)

    (add_bias,) = mlx_lm_processors(logit_bias={t: float(v) for t, v in bias.items()})

    def biased(tokens: mx.array, logits: mx.array) -> mx.array:
        if highest >= logits.shape[-1]:
            raise ValueError(f"logit_bias names token {highest}, outside the vocabulary of {logits.shape[-1]}")
        return add_bias(tokens, logits)

    return biased


def make_logits_processors(
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = 20,
    logit_bias: Optional[dict] = None,
) -> list[LogitsProcessor]:
    """The processors for the usual options, in the order mlx-lm applies them (bias first)."""
    processors = []
    if logit_bias:
        processors.append(make_processor("logit_bias", bias=logit_bias))
    if repetition_penalty is not None:  # checked even when 1 (off)
        penalise = make_processor("repetition_penalty", penalty=repetition_penalty,
                                  context_size=repetition_context_size)
        if repetition_penalty != 1:
            processors.append(penalise)
    return processors
