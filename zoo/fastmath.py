"""exp, softmax, exact GELU and SiLU for the compiled training step on CPU, written with the
plain arithmetic that MLX's compiler fuses.

MLX's Linux CPU kernels evaluate `mx.exp` and `mx.erf` (so `mx.softmax`, MLX's fused
attention and `nn.gelu`) one element at a time through libm calls (`std::fma`, `std::floor`):
about 12 ns per element for exp and 33 for erf on this machine, where PyTorch's vectorised
kernels take 1-3. Inside `mx.compile`, additions, multiplies, comparisons, selects and bit
casts fuse into a few generated C++ loops free of libm calls, so `exp` written with them runs
about 3x faster than `mx.exp` (docs/training.md); `softmax` uses it. MLX fuses at most
about ten ops deep per loop, so longer formulas (an erf polynomial) split into many loops and gain nothing: `gelu`
keeps `mx.erf` for the value and saves the derivative's second scalar pass instead; `silu`
takes its sigmoid from `exp`.
Only the training forward uses these (`Context.training`, set by `model.train()` without a
cache); inference keeps MLX's kernels, which uncompiled decoding prefers (one kernel per op).

Accuracy (tests/test_fastmath.py, against float64 over dense ranges): `exp` is Cephes' expf,
within 1.5 ulp (0 below -87.7, where the true value is subnormal); softmax and GELU, values and
gradients (and SiLU's), agree with PyTorch's float64 ones to float32 rounding.
"""

from __future__ import annotations

import math

import mlx.core as mx

# -- exp: Cephes expf (x = n ln2 + r, |r| <= ln2 / 2; e^r by a degree-5 polynomial; 2^n by
# writing n + 127 into the exponent bits). Round-to-nearest by adding and subtracting 1.5 * 2^23
# (floor would be a libm call per element).
_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = HI + LO; n * HI is exact for |n| < 2^15
_EXP_MAX = 88.3762626647949  # ln(2^127.5): beyond it the result is inf (0 below -EXP_MAX)
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
          1.6666665459e-1, 5.0000001201e-1)


def exp(x: mx.array) -> mx.array:
    """e^x for float32 x, elementwise (0 for x <= -87.7; inf for x > 88.37, which float32's top
    half-binade could still hold: the training kernels call it on x <= 0). Written shallow
    (Estrin's scheme) because MLX's compiler fuses at most about ten ops deep into one loop."""
    big = x > _EXP_MAX
    x = mx.clip(x, -_EXP_MAX, _EXP_MAX)
    n = (x * _LOG2E + _ROUND) - _ROUND  # round(x / ln 2), an integer-valued float in [-127, 128]
    r = (x - n * _LN2_HI) - n * _LN2_LO  # [-ln2/2, ln2/2]
    r2 = r * r
    p0, p1, p2, p3, p4, p5 = _EXP_P
    p = ((p0 * r + p1) * r2 + (p2 * r + p3)) * r2 + (p4 * r + p5)  # Cephes' polynomial, Estrin order
    y = p * r2 + (r + 1.0)  # e^r
    two_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # 2^n (0 at n = -127)
    return mx.where(big, math.inf, y * two_n)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 by MLX's erf, with its
    derivative Phi(x) + x phi(x) built in the forward: autodiff of erf would call MLX's
    scalar exp again, this reuses Phi and takes phi = exp(-x^2 / 2) / sqrt(2 pi) from `exp`.
    The value is x Phi(x) exactly (the second term is x (x - x) phi = 0); stop_gradient makes
    Phi and phi constants, so the gradient is Phi + x phi."""
    xs = mx.stop_gradient(x)
    cdf = 0.5 * (1.0 + mx.erf(xs * math.sqrt(0.5)))
    pdf = exp(-0.5 * xs * xs) * (1.0 / math.sqrt(2.0 * math.pi))
    return x * cdf + xs * (x - xs) * pdf


def silu(x: mx.array) -> mx.array:
    """SiLU x sigmoid(x), sigmoid by `exp`, with its derivative s + x s (1 - s) built in the
    forward the same way as `gelu`'s (MLX's sigmoid and its autodiff run the scalar exp)."""
    xs = mx.stop_gradient(x)
    s = 1.0 / (1.0 + exp(-xs))
    return x * s + xs * (x - xs) * (s * (1.0 - s))


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (rows of -inf only where some entry is finite)."""
    e = exp(x - mx.stop_gradient(mx.max(x, axis=-1, keepdims=True)))
    return e / mx.sum(e, axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(x, cotangent, output):
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))
