"""`kvzoo convert`: write a checkpoint as an MLX-quantized folder (what `mlx_lm.convert -q` writes).

    kvzoo convert my-hf-folder my-4bit --bits 4 --group-size 64
    kvzoo convert model.Q4_K_M.gguf my-8bit --bits 8

The source is an HF-style folder (float or already MLX-quantized weights are refused: load
float weights to requantize) or a .gguf file (dequantized by gguf-py first). Every Linear and
Embedding whose input width the group size divides is quantized with `mx.quantize`, as mlx-lm
does; the rest stay float. The destination is read by `zoo.load` and by `mlx_lm.load`.
Tokenizer files beside a folder source are copied; a GGUF's tokenizer stays in the GGUF.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HELP = "quantize a checkpoint (HF folder or .gguf) into an MLX-quantized folder mlx-lm reads"

# Files beside the weights that belong in the converted folder (tokenizer and generation settings).
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
          "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
          "chat_template.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zoo.checkpoints.quantized import BITS, GROUP_SIZES

    parser.add_argument("source", metavar="SRC", help="HF-style folder (config.json + *.safetensors) or .gguf file")
    parser.add_argument("dest", metavar="DST", help="folder to write (must not exist, or be empty)")
    parser.add_argument("--bits", type=int, default=4, choices=BITS, help="bits per weight (default 4)")
    parser.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES,
                        help="weights sharing one scale and bias (default 64)")
    parser.add_argument("--dtype", default="stored", choices=["stored", "float32", "float16", "bfloat16"],
                        help="dtype of the scales, biases and unquantized layers (default: as stored)")


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from zoo.checkpoints import loading, quantized

    source, dest = Path(args.source), Path(args.dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} already exists and is not an empty folder; convert writes a new folder")
    dtype = None if args.dtype == "stored" else getattr(mx, args.dtype)
    model = loading.load_model(source, dtype=dtype)
    if quantized.is_quantized(model):
        raise ValueError(f"{source} is already quantized; convert quantizes float weights")
    before = quantized.weight_bytes(model)
    quantized.quantize(model, bits=args.bits, group_size=args.group_size)
    after = quantized.weight_bytes(model)
    loading.save(model, dest)
    copied = [name for name in COPIED if source.is_dir() and (source / name).is_file()]
    for name in copied:
        shutil.copy(source / name, dest / name)
    print(f"wrote {dest}: {args.bits}-bit weights, group size {args.group_size}; "
          f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB of weights", file=sys.stderr)
    if not copied:
        print(f"note: no tokenizer files copied ({source} has none beside the weights)", file=sys.stderr)
    return 0
