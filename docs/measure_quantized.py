"""Measure what docs/performance.md reports under "Quantized weights": memory and decode
tokens/s of one model with fp32, fp16, 8-bit and 4-bit weights (MLX's affine quantization,
`zoo.checkpoints.quantized.quantize`, what `kvzoo convert --bits` writes), on this machine.

    PYTHONPATH=. python docs/measure_quantized.py [--preset small] [--tokens 64] [--repeats 5]

The model is the `llama` preset with random weights (decode speed does not depend on their
values). Each variant decodes `--tokens` greedy tokens after a 32-token prompt with the
default (preallocated) cache, through zoo.generate_step; tokens/s over tokens 2..N, median of
`--repeats` runs, the variants interleaved run by run so that load on a shared machine falls
on all of them alike. Memory: the bytes of the weights (packed weights, scales and biases;
all four models are held at once, so MLX's process-wide peak memory would not tell them apart).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import zoo  # first: it loads OpenBLAS for MLX, which works only before mlx.core (kvzoo/blas.py)
import mlx.core as mx
import numpy as np

from zoo.checkpoints import quantized


def variants(preset: str) -> dict[str, zoo.CausalLM]:
    """name -> model: the same weights in fp32, fp16, 8-bit and 4-bit (group size 64)."""
    base = zoo.build("llama", preset=preset, seed=0)
    mx.eval(base.parameters())
    out = {"fp32": base}
    half = zoo.build("llama", preset=preset, seed=0)
    half.update(base.parameters())
    half.set_dtype(mx.float16)
    out["fp16"] = half
    for bits in (8, 4):
        q = zoo.build("llama", preset=preset, seed=0)
        q.update(base.parameters())
        out[f"{bits}-bit g64"] = quantized.quantize(q, bits=bits, group_size=64)
    # What mlx-community folders hold: quantized from fp16 weights, so scales, biases and the
    # norms are fp16 too (and activations run in fp16).
    q = zoo.build("llama", preset=preset, seed=0)
    q.update(half.parameters())
    out["4-bit g64, fp16 scales"] = quantized.quantize(q, bits=4, group_size=64)
    return out


def decode_tps(model, prompt: list[int], tokens: int) -> float:
    start = None
    n = 0
    for n, _ in enumerate(zoo.generate_step(model, prompt, max_tokens=tokens), start=1):
        if n == 1:
            start = time.perf_counter()  # the first token carries the prefill
    return (n - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="leave a variant out (e.g. --skip fp16: MLX's CPU fp16 is slow to measure)")
    args = parser.parse_args()
    models = {name: m for name, m in variants(args.preset).items() if name not in args.skip}
    prompt = np.random.RandomState(0).randint(0, models["fp32"].config.vocab_size, 32).tolist()
    for model in models.values():  # warm-up: compile kernels, touch the weights
        decode_tps(model, prompt, 4)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            runs[name].append(decode_tps(model, prompt, args.tokens))
    cfg = models["fp32"].config
    print(f"llama {args.preset}: d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
          f"{models['fp32'].n_params / 1e6:.1f}M parameters; device {mx.default_device()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{args.tokens} tokens after a {len(prompt)}-token prompt, median of {args.repeats} (min-max)\n")
    print("| weights | weight bytes | vs fp32 | decode tok/s | vs fp32 |")
    print("|---|---|---|---|---|")
    full, full_tps = quantized.weight_bytes(models["fp32"]), statistics.median(runs["fp32"])
    for name, model in models.items():
        size, tps = quantized.weight_bytes(model), statistics.median(runs[name])
        print(f"| {name} | {size / 2**20:.1f} MiB | {size / full:.1%} | "
              f"{tps:.1f} ({min(runs[name]):.1f}-{max(runs[name]):.1f}) | {tps / full_tps:.2f}x |")


if __name__ == "__main__":
    main()
