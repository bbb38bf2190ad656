"""Training throughput: kvzoo's compiled MLX step against PyTorch on HF's GPT2LMHeadModel, same
config, same batch shape, same optimizer (AdamW, clipping), measured in one run, interleaved.

    python docs/measure_training.py [--steps 10] [--rounds 3] [--batch 32] [--block 128]
    OPENBLAS_NUM_THREADS=1 python docs/measure_training.py --torch-threads 1   # both on one core

The default shape is the char-level recipe of docs/training.md (4 layers, 4 heads, d_model 64,
block 128, batch 32, exact GELU, tied, dropout 0.1 on embeddings and residuals; attention-
probability dropout off in both since kvzoo has none). Prints tokens/s per round and the median
ratio, by wall clock and by this process's CPU time (on a shared, overloaded machine the wall
clock favours whichever framework runs more threads, each of which gets a share of the
cores; CPU seconds per token is the cost of the work itself). The machine is shared: the
numbers move with its load, reported beside them.
"""

from __future__ import annotations

# isort: off
# zoo first: it loads OpenBLAS for MLX's matmuls, which works only before mlx.core is imported
# (kvzoo/blas.py). Imported after mlx, MLX keeps its reference BLAS and the step is ~3x slower.
import zoo
# isort: on

import argparse
import os
import statistics
import time

import mlx.core as mx
import numpy as np

from kvzoo import blas
from zoo.training.optimizer import AdamW
from zoo.training.step import make_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and framework")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own); MLX's BLAS threads "
                             "follow OPENBLAS_NUM_THREADS")
    args = parser.parse_args()

    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    shape = {"vocab_size": args.vocab, "d_model": args.d_model, "n_layers": args.layers,
             "n_heads": args.heads, "max_positions": args.block, "activation": "gelu",
             "dropout": args.dropout}
    model = zoo.build("gpt2", seed=0, **shape)
    model.train()
    step = make_step(model, AdamW(3e-3, weight_decay=0.1), clip=1.0)

    hf_config = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.d_model, n_layer=args.layers,
                                        n_head=args.heads, n_positions=args.block, activation_function="gelu",
                                        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).train()
    params = list(hf.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))

    rng = np.random.default_rng(0)

    def batch() -> np.ndarray:
        return rng.integers(0, args.vocab, size=(args.batch, args.block + 1))

    def mlx_steps(n: int) -> tuple[float, float]:
        tic, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            step([mx.array(batch(), dtype=mx.int32)]).item()
        return time.perf_counter() - tic, time.process_time() - cpu

    def torch_steps(n: int) -> tuple[float, float]:
        tic, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            ids = torch.tensor(batch(), dtype=torch.long)
            opt.zero_grad(set_to_none=True)
            logits = hf(input_ids=ids[:, :-1]).logits  # [B, T, V], as kvzoo's step
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss.item()
        return time.perf_counter() - tic, time.process_time() - cpu

    mlx_steps(2), torch_steps(2)  # compile / warm up
    tokens = args.steps * args.batch * args.block
    ratios, cpu_ratios = [], []
    print(f"GPT-2 {args.layers}x{args.d_model}, {args.heads} heads, block {args.block}, batch {args.batch}, "
          f"vocab {args.vocab}, dropout {args.dropout}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), mlx {mx.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"MLX matmuls: {blas.choice().describe()}")
    for r in range(args.rounds):
        (t_mlx, c_mlx), (t_torch, c_torch) = mlx_steps(args.steps), torch_steps(args.steps)
        ratios.append(t_torch / t_mlx)
        cpu_ratios.append(c_torch / c_mlx)
        print(f"round {r + 1}: kvzoo (MLX) {tokens / t_mlx:,.0f} tok/s ({tokens / c_mlx:,.0f} per CPU-s)   "
              f"PyTorch {tokens / t_torch:,.0f} tok/s ({tokens / c_torch:,.0f} per CPU-s)   "
              f"wall ratio {t_torch / t_mlx:.2f}x, CPU ratio {c_torch / c_mlx:.2f}x   load {os.getloadavg()[0]:.1f}")
    print(f"median ratio kvzoo / PyTorch: {statistics.median(ratios):.2f}x by wall clock, "
          f"{statistics.median(cpu_ratios):.2f}x by CPU time")


if __name__ == "__main__":
    main()
