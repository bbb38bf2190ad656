"""What runs fastest where: the default dtype per MLX device, chosen by measurement.

On MLX's Linux CPU backend half precision is no win: fp32 matmuls go to the BLAS (OpenBLAS
with kvzoo/blas.py), fp16/bf16 ones to MLX's own loops. Measured on a 2-core x86_64 with OpenBLAS
(docs/performance.md, "Half precision"): GPT-2 124M and the Llama-style ~100M model decode in
fp16 at 0.17-0.18x and bf16 at 0.44-0.45x the fp32 speed, and prefill at 0.06-0.08x. So the CPU
default is float32. On a GPU (Metal or CUDA) the kernels
are native in half precision and weights are half the bytes to read per token, so float16 is the
default there (not measured on this project's machines: no GPU was lent).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

DEFAULT_DTYPE = {"cpu": mx.float32, "gpu": mx.float16}

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def device_kind(device: Optional[mx.Device] = None) -> str:
    """'cpu' or 'gpu' for `device` (the default device when None)."""
    device = device or mx.default_device()
    return "gpu" if device.type == mx.DeviceType.gpu else "cpu"


def default_dtype(device: Optional[mx.Device] = None) -> mx.Dtype:
    """The dtype that decodes fastest on `device` by our measurements."""
    return DEFAULT_DTYPE[device_kind(device)]


def parse_dtype(name: Optional[str]) -> mx.Dtype:
    """'float32' | 'float16' | 'bfloat16' | None/'auto' (the device default) -> mx.Dtype."""
    if name is None or name == "auto":
        return default_dtype()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]
