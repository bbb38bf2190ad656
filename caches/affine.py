"""Affine quantization for any group size, on mx.quantize's rounding conventions.

mx.quantize groups at least 32 features, so it cannot quantize the heads of small models
(stories260K's head size is 8) nor the short token groups of KIVI's per-channel keys. This
module quantizes groups of any size `g` along the last axis with the same arithmetic, so that
for g in {32, 64, 128} it gives mx.quantize + mx.dequantize value for value (float32), and for
narrower groups exactly what mx.quantize gives a group made of those values repeated
(tests/test_affine.py checks both against mx.quantize itself).

The conventions (mx.quantize's affine mode): per group, with edge = the min or the max
(whichever is larger in magnitude) and s = (max - min) / (2^bits - 1), q0 = round(edge / s),
scale = edge / q0 and bias = edge (so zero and the far edge are levels), and each value is
round((x - bias) / scale) clipped to 0..2^bits-1. Levels are packed little-end first into
uint8 bytes (`bits` bits per value, a row's D * bits bits in D * bits / 8 bytes).

`grid="minmax"` is KIVI's quantizer instead (jy-yuan/KIVI, quant/new_pack.py,
quant_and_pack_kcache / quant_and_pack_vcache / triton_quantize_and_pack_along_last_dim):
scale = (max - min) / (2^bits - 1), bias = min, level = round(clamp((x - min) / scale)), so
both ends of a group are levels and zero need not be; here in float32, the scale kept >= 1e-7
(KIVI divides by zero on a constant group).
"""

from __future__ import annotations

import mlx.core as mx

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)


def check(bits: int, group_size: int, width: int | None = None) -> None:
    """Raise ValueError unless `bits` is allowed and `group_size` (>= 2) divides `width`, with
    a row of `width` values packing into whole bytes."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"affine quantization: bits must be one of {ALLOWED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"affine quantization: group_size must be an int >= 2, got {group_size!r}")
    if width is not None and (width % group_size or width * bits % 8):
        raise ValueError(f"affine quantization: rows of {width} values do not split into groups of "
                         f"{group_size} packed at {bits} bits into whole bytes")


GRIDS = ("mlx", "minmax")


def _grid(x: mx.array, bits: int, group_size: int, other_side: bool = False, grid: str = "mlx"):
    """(levels [..., G, g] float32, scale [..., G, 1], bias [..., G, 1], on_boundary [..., G, 1])."""
    if grid not in GRIDS:
        raise ValueError(f"affine quantization: grid must be one of {GRIDS}, got {grid!r}")
    g = x.astype(mx.float32).reshape(*x.shape[:-1], -1, group_size)  # [..., G, group_size]
    n_levels = 2**bits - 1
    low, high = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = mx.maximum((high - low) / n_levels, 1e-7)
    if grid == "minmax":  # KIVI: both ends are levels, no zero-point to round
        levels = mx.clip(mx.round((g - low) / scale), 0, n_levels)
        return levels, scale, low, mx.zeros(low.shape, dtype=mx.bool_)
    side = mx.abs(low) > mx.abs(high)
    scale = mx.where(side, scale, -scale)
    edge = mx.where(side, low, high)
    ratio = edge / scale
    q0 = mx.round(ratio)
    if other_side:
        q0 = mx.where(ratio - mx.floor(ratio) < 0.5, q0 + 1, q0 - 1)  # the other neighbour of ratio
    on_boundary = mx.abs(ratio - mx.floor(ratio) - 0.5) <= 0.01
    scale = mx.where(q0 != 0, edge / mx.where(q0 != 0, q0, 1), scale)
    bias = mx.where(q0 == 0, 0, edge)
    levels = mx.clip(mx.round((g - bias) / scale), 0, n_levels)
    return levels, scale, bias, on_boundary


def affine_grid(x: mx.array, bits: int, group_size: int, *,
                other_side: bool = False) -> tuple[mx.array, mx.array]:
    """(x [..., D] rounded on the affine grid, or with `other_side` on the grid it would pick had
    its zero-point rounding gone the other way; whether each value's group sat on that rounding
    boundary). When edge / s is a half-integer float noise picks q0 and the whole group's grid
    moves (found by the property test on a group with edge / s = -130.5000)."""
    levels, scale, bias, on_boundary = _grid(x, bits, group_size, other_side)
    rounded = (levels * scale + bias).reshape(x.shape)
    return rounded, mx.broadcast_to(on_boundary, levels.shape).reshape(x.shape)


def quantize(x: mx.array, bits: int, group_size: int, grid: str = "mlx") -> tuple[mx.array, mx.array, mx.array]:
    """x [..., D] -> (packed uint8 [..., D * bits / 8], scales [..., D / g], biases [..., D / g]);
    scales and biases in x's dtype, as mx.quantize returns them."""
    check(bits, group_size, x.shape[-1])
    levels, scale, bias, _ = _grid(x, bits, group_size, grid=grid)
    packed = pack(levels.reshape(x.shape).astype(mx.uint8), bits)
    return packed, scale[..., 0].astype(x.dtype), bias[..., 0].astype(x.dtype)


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
               group_size: int) -> mx.array:
    """The inverse of `quantize` up to rounding: [..., D] in the scales' dtype."""
    levels = unpack(packed, bits).astype(mx.float32)  # [..., D]
    shape = levels.shape
    levels = levels.reshape(*shape[:-1], -1, group_size)  # [..., G, g]
    out = levels * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return out.reshape(shape).astype(scales.dtype)


def round_trip(x: mx.array, bits: int, group_size: int, grid: str = "mlx") -> mx.array:
    """x [..., D] quantized and dequantized per group of its last axis (in x's dtype)."""
    return dequantize(*quantize(x, bits, group_size, grid), bits, group_size).astype(x.dtype)


def step(x: mx.array, bits: int, group_size: int, grid: str = "mlx") -> mx.array:
    """The distance between neighbouring levels at each value of x [..., D]: its group's scale."""
    _, scale, _, _ = _grid(x, bits, group_size, grid=grid)
    return mx.abs(mx.broadcast_to(scale, (*scale.shape[:-1], group_size))).reshape(x.shape)


def pack(levels: mx.array, bits: int) -> mx.array:
    """uint8 levels [..., D] (each < 2^bits) -> bytes [..., D * bits / 8], lowest bits first."""
    shifts = mx.arange(bits, dtype=mx.uint8)
    planes = (levels[..., None] >> shifts) & 1  # [..., D, bits]
    planes = planes.reshape(*levels.shape[:-1], -1, 8)  # [..., D * bits / 8, 8]
    weights = (mx.ones(8, dtype=mx.uint8) << mx.arange(8, dtype=mx.uint8))
    return (planes * weights).sum(-1).astype(mx.uint8)


def unpack(packed: mx.array, bits: int) -> mx.array:
    """The inverse of `pack`: bytes [..., n] -> uint8 levels [..., n * 8 / bits]."""
    planes = (packed[..., None] >> mx.arange(8, dtype=mx.uint8)) & 1  # [..., n, 8]
    planes = planes.reshape(*packed.shape[:-1], -1, bits)  # [..., D, bits]
    weights = (mx.ones(bits, dtype=mx.uint8) << mx.arange(bits, dtype=mx.uint8))
    return (planes * weights).sum(-1).astype(mx.uint8)
