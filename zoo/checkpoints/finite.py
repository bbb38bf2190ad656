"""Checks that what a checkpoint holds is numbers a model can run on.

A NaN or inf inside one weight loads without complaint and turns every logit into NaN or
garbage: a silent wrong answer. So every floating-point tensor is checked once at load (one
reduction per tensor, all read in one evaluation), and every numeric config field that must be
a positive finite number is checked where it is read; errors name the tensor or field and the
file.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import mlx.core as mx

# HF config.json fields that must be finite numbers > 0 when present (None: absent).
POSITIVE_HF_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon",
                      "rope_theta", "initializer_range", "partial_rotary_factor")


def check_finite(weights: Mapping[str, mx.array], where: Callable[[str], str]) -> None:
    """Raise ValueError naming the first tensor holding NaN or inf (`where(name)`: its file)."""
    names = [n for n, a in weights.items() if mx.issubdtype(a.dtype, mx.floating)]
    if not names:
        return
    flags = mx.stack([mx.all(mx.isfinite(weights[n])) for n in names]).tolist()  # [n] bools
    bad = [n for n, ok in zip(names, flags) if not ok]
    if not bad:
        return
    first = weights[bad[0]]
    nans = int(mx.sum(mx.isnan(first)).item())
    infs = int(mx.sum(mx.isinf(first)).item())
    others = f"; {len(bad) - 1} more tensor(s) too: {bad[1:4]}" if len(bad) > 1 else ""
    raise ValueError(
        f"{where(bad[0])}: tensor {bad[0]!r} holds non-finite values ({nans} NaN, {infs} inf of "
        f"{first.size}); the checkpoint is corrupt{others}")


def is_positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_positive_fields(config: Mapping[str, Any], fields: tuple[str, ...], source: str) -> None:
    """Every field of `fields` present in `config` is a finite number > 0 (ValueError naming it)."""
    for name in fields:
        value = config.get(name)
        if value is not None and not is_positive_number(value):
            raise ValueError(f"{source}: {name} must be a finite number > 0, got {value!r}")
