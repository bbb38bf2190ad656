"""`kvzoo info`: versions, device, the BLAS serving MLX's matmuls, and what is registered."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from typing import Any

HELP = "Show versions, the device, which BLAS MLX uses, and the registered parts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-measure", action="store_true",
                        help="skip the timings: the 512^3 matmul (a few ms with OpenBLAS, ~50 ms "
                             "without) and the one-row product over a 98 MB matrix (~0.2 s)")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect(measure: bool = True) -> dict[str, Any]:
    """Everything `kvzoo info` reports, as a JSON-able dict."""
    import mlx.core as mx

    import caches
    import positional
    import sampling
    import zoo
    from kvzoo import blas, gemv

    chosen = blas.choice()
    blas_info: dict[str, Any] = {
        "fast": chosen.fast,
        "library": chosen.library,
        "how": chosen.how,
        "threads": chosen.threads,
        "config": chosen.config,
        "bound": blas.bound_library(),  # what libmlx's cblas_sgemm really resolves to
        "gemv_shim": chosen.gemv,  # the shim forwarding one-row products to sgemv, or None
        "gemv_how": chosen.gemv_how,
        "summary": chosen.describe(),
    }
    if measure:
        blas_info.update(blas.measure_sgemm())
    shim = blas.shim()
    if shim is not None:  # calls so far, the measurement's included: proof that MLX calls it
        blas_info["gemv_shim_calls"] = gemv.counts(shim)
    device = mx.default_device()
    device_info = mx.device_info() if hasattr(mx, "device_info") else {}
    return {
        "versions": {
            "kvzoo": _version("kvzoo"),
            "mlx": getattr(mx, "__version__", _version("mlx")),
            "mlx-lm": _version("mlx-lm"),
            "python": platform.python_version(),
        },
        "device": {
            "default": str(device),
            "name": device_info.get("device_name", platform.processor() or platform.machine()),
            "architecture": device_info.get("architecture", platform.machine()),
            "metal": bool(mx.metal.is_available()),
            "cuda": bool(hasattr(mx, "cuda") and mx.cuda.is_available()),
            "platform": platform.platform(),
        },
        "blas": blas_info,
        "registered": {
            "families": zoo.available(),
            "caches": caches.available(),
            "positional": positional.available(),
            "samplers": sampling.available(),
        },
    }


def run(args: argparse.Namespace) -> int:
    info = collect(measure=not args.no_measure)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    v, d, b, r = info["versions"], info["device"], info["blas"], info["registered"]
    lines = [
        "versions    " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"device      {d['default']} ({d['name']}, {d['architecture']}); "
        f"metal {'yes' if d['metal'] else 'no'}, cuda {'yes' if d['cuda'] else 'no'}",
        f"blas        {b['summary']}",
        f"            libmlx's cblas_sgemm is bound to: {b['bound'] or 'unknown'}",
    ]
    if b["gemv_shim"]:
        lines.append(f"            one-row products: sgemv through the gemv shim {b['gemv_shim']} "
                     f"({b['gemv_how']})")
    elif b["fast"]:
        lines.append(f"            one-row products: the BLAS's sgemm ({b['gemv_how']})")
    if "mlx_sgemm_gflops" in b:
        rows, cols = b["row_product_shape"][2], b["row_product_shape"][1]
        lines.append(f"            fp32 {b['n']}^3 matmul: {b['mlx_sgemm_gflops']:.1f} GFLOP/s; "
                     f"one-row product [1, {cols}] @ [{cols}, {rows}]: {b['row_product_gbs']:.1f} GB/s")
    if "gemv_shim_calls" in b:
        calls = b["gemv_shim_calls"]
        lines.append(f"            shim calls so far: {calls['gemv']} to sgemv, {calls['gemm']} to sgemm")
    for kind, names in r.items():
        lines.append(f"{kind:<12}{', '.join(names)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(json="--json" in sys.argv, no_measure=False)))
