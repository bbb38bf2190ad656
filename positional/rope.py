"""Rotary position embedding (RoPE): rotate queries and keys by their absolute position."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import mlx.core as mx

from .base import Positional
from .registry import register


LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_scaling(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validated Llama 3 frequency scaling (HF's `rope_scaling` with rope_type "llama3").

    Returns {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}; a
    missing, extra or non-positive field, or low_freq_factor >= high_freq_factor, is a ValueError.
    """
    if not isinstance(options, Mapping):
        raise TypeError(f"llama3 rope scaling must be a dict with {', '.join(LLAMA3_FIELDS)}, got {options!r}")
    given = {k: v for k, v in options.items() if k not in ("rope_type", "type", "rope_theta")}
    missing = [k for k in LLAMA3_FIELDS if k not in given]
    extra = sorted(set(given) - set(LLAMA3_FIELDS))
    if missing or extra:
        raise ValueError(f"llama3 rope scaling needs exactly {', '.join(LLAMA3_FIELDS)}; "
                         f"missing {missing}, unexpected {extra}")
    for key in LLAMA3_FIELDS:
        value = given[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"llama3 rope scaling {key} must be a positive number, got {value!r}")
    if not given["low_freq_factor"] < given["high_freq_factor"]:
        raise ValueError(f"llama3 rope scaling needs low_freq_factor < high_freq_factor, got "
                         f"{given['low_freq_factor']} and {given['high_freq_factor']}")
    context = given["original_max_position_embeddings"]
    if context != int(context):
        raise ValueError(f"llama3 rope scaling original_max_position_embeddings must be a whole number, got {context!r}")
    return {"factor": float(given["factor"]), "low_freq_factor": float(given["low_freq_factor"]),
            "high_freq_factor": float(given["high_freq_factor"]), "original_max_position_embeddings": int(context)}


def llama3_wavelengths(dims: int, base: float, scaling: Mapping[str, float]) -> mx.array:
    """Per-pair wavelength divisors for mx.fast.rope's `freqs` under Llama 3 scaling [dims/2].

    Pair i turns by position / freqs[i] radians. Unscaled, freqs[i] = base^(2i/dims). Llama 3
    (Meta's reference code) leaves short wavelengths (< original context / high_freq_factor)
    alone, divides the frequency of long ones (> original context / low_freq_factor) by
    `factor`, and interpolates smoothly between the two.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, dims, 2):
        period = base ** (i / dims)  # 1 / inverse frequency
        wavelength = 2 * math.pi * period
        if wavelength < context / high:
            out.append(period)
        elif wavelength > context / low:
            out.append(period * factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append(period / ((1 - smooth) / factor + smooth))
    return mx.array(out, dtype=mx.float32)


@register("rope")
class RoPE(Positional):
    """mx.fast.rope over the first `dims` features of each head.

    base: the frequency base (10000 for Llama 1/2). traditional: True pairs consecutive
    features (x0,x1),(x2,x3)... as in the original paper and llama.cpp's GGUF layout; False
    pairs the two halves (x_i, x_{i+D/2}) as in HF checkpoints. scale: linear position scaling,
    positions are multiplied by it (1/factor for "linear" rope_scaling). llama3: Llama 3's
    per-frequency scaling (`llama3_scaling` fields), as in Llama 3.1+ checkpoints.
    """

    def __init__(self, dims: int, base: float = 10000.0, traditional: bool = False,
                 scale: float = 1.0, llama3: Optional[Mapping[str, float]] = None) -> None:
        super().__init__()
        if dims < 2 or dims % 2:
            raise ValueError(f"rope needs an even number of rotated dims >= 2, got {dims}")
        if base <= 0 or scale <= 0:
            raise ValueError(f"rope base and scale must be positive, got base={base}, scale={scale}")
        self.dims = dims
        self.base = float(base)
        self.traditional = bool(traditional)
        self.scale = float(scale)
        self.llama3 = None if llama3 is None else llama3_scaling(llama3)
        # "_" keeps the table out of the module's parameters (it is derived, never loaded).
        self._freqs = None if llama3 is None else llama3_wavelengths(dims, self.base, self.llama3)

    @classmethod
    def from_config(cls, config) -> "RoPE":
        return cls(config.head_dim, config.rope_base, config.rope_traditional, config.rope_scale,
                   llama3=config.rope_scaling)

    def _apply(self, x: mx.array, offset: mx.array) -> mx.array:
        base = None if self._freqs is not None else self.base  # mx.fast.rope takes one or the other
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=base,
                            scale=self.scale, offset=offset, freqs=self._freqs)

    def rotate(self, queries, keys, positions):
        offset = positions[..., 0]  # positions are contiguous from here
        return self._apply(queries, offset), self._apply(keys, offset)
