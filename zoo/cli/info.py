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
                        help="skip the 512^3 matmul timing (a few ms with OpenBLAS, ~50 ms without)")


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
    from kvzoo import blas

    chosen = blas.choice()
    blas_info: dict[str, Any] = {
        "fast": chosen.fast,
        "library": chosen.library,
        "how": chosen.how,
        "threads": chosen.threads,
        "config": chosen.config,
        "bound": blas.bound_library(),  # what libmlx's cblas_sgemm really resolves to
        "summary": chosen.describe(),
    }
    if measure:
        blas_info.update(blas.measure_sgemm())
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
    if "mlx_sgemm_gflops" in b:
        lines.append(f"            fp32 {b['n']}^3 matmul: {b['mlx_sgemm_gflops']:.1f} GFLOP/s")
    for kind, names in r.items():
        lines.append(f"{kind:<12}{', '.join(names)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(json="--json" in sys.argv, no_measure=False)))
