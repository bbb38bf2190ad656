"""Per-op CPU time of the char recipe's training step, MLX against PyTorch, each op alone.

    OPENBLAS_NUM_THREADS=1 python docs/profile_training_ops.py [--threads 1]

One layer's shapes (B 32, T 128, d_model 64, 4 heads of 16, d_ff 256, vocab 65): forward alone
and forward + backward (a dense cotangent), each MLX function compiled, medians of 3 runs; then the elementwise kernels alone (exp and
softmax on the scores [32, 4, 128, 128], erf and GELU on the MLP hidden [32, 128, 256]) and
zoo.fastmath's versions. Prints CPU milliseconds (this process's CPU time per call). Set
OPENBLAS_NUM_THREADS to match --threads (torch's threads) for a like-for-like comparison.
"""

from __future__ import annotations

# isort: off
import zoo  # first: it loads OpenBLAS for MLX, which works only before mlx.core (kvzoo/blas.py)
# isort: on

import argparse
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from mlx import nn
from mlx.utils import tree_map

from caches import EXACT
from zoo import fastmath
from zoo.layers import training_attention
from zoo.training.optimizer import AdamW

B, T, D, H, FF, V = 32, 128, 64, 4, 256, 65


def cpu_ms(f: Callable[[], object], n: int = 6, repeats: int = 3) -> float:
    """CPU milliseconds per call of f: the median of `repeats` runs of n calls, after two
    warm-up calls (the machine is shared: single runs move with its load)."""
    f()
    f()
    runs = []
    for _ in range(repeats):
        tic = time.process_time()
        for _ in range(n):
            f()
        runs.append((time.process_time() - tic) / n * 1e3)
    return statistics.median(runs)


def mlx_times(fn: Callable, *xs: np.ndarray) -> tuple[float, float]:
    """(forward, forward + backward) CPU ms; the backward gets a dense cotangent, as in a step."""
    arrays = [mx.array(x) for x in xs]
    cotangent = mx.array(np.random.default_rng(1).standard_normal(fn(*arrays).shape).astype(np.float32))
    mx.eval(arrays, cotangent)
    forward = mx.compile(fn)
    backward = mx.compile(mx.grad(lambda *a: mx.sum(fn(*a) * cotangent), argnums=list(range(len(xs)))))
    return cpu_ms(lambda: mx.eval(forward(*arrays))), cpu_ms(lambda: mx.eval(backward(*arrays)))


def torch_times(fn: Callable, *xs: np.ndarray) -> tuple[float, float]:
    tensors = [torch.from_numpy(x).requires_grad_() for x in xs]
    with torch.no_grad():
        cotangent = torch.from_numpy(np.random.default_rng(1).standard_normal(fn(*tensors).shape).astype(np.float32))
        forward = cpu_ms(lambda: fn(*tensors))
    return forward, cpu_ms(lambda: fn(*tensors).backward(cotangent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    torch.set_num_threads(parser.parse_args().threads)
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    positions = mx.arange(T, dtype=mx.int32)
    causal = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    qkv = (r(B, H, T, 16), r(B, H, T, 16), r(B, H, T, 16))
    cases = {
        "attention, mx.fast sdpa": (
            lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal"),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), qkv),
        "attention, training_attention": (
            lambda q, k, v: training_attention(q, k, v, scale=0.25, positions=positions, reference=EXACT,
                                               bias=None),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), qkv),
        "GELU, nn.gelu": (nn.gelu, F.gelu, (r(B, T, FF),)),
        "GELU, fastmath.gelu": (fastmath.gelu, F.gelu, (r(B, T, FF),)),
        "LayerNorm": (lambda x, w, b: mx.fast.layer_norm(x, w, b, 1e-5),
                      lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-5), (r(B, T, D), r(D), r(D))),
        "Linear 64->256": (lambda x, w, b: mx.addmm(b, x, w.T), F.linear, (r(B, T, D), r(FF, D), r(FF))),
        "Linear 256->64": (lambda x, w, b: mx.addmm(b, x, w.T), F.linear, (r(B, T, FF), r(D, FF), r(D))),
        "Linear 64->192": (lambda x, w, b: mx.addmm(b, x, w.T), F.linear, (r(B, T, D), r(3 * D, D), r(3 * D))),
        "tied head 64->65": (lambda x, w: x @ w.T, F.linear, (r(B, T, D), r(V, D))),
    }
    print(f"{'op (one layer)':32s} {'MLX fwd':>8s} {'fwd+bwd':>8s} {'torch fwd':>10s} {'fwd+bwd':>8s}  (CPU ms)")
    for name, (ours, theirs, xs) in cases.items():
        (mf, mb), (tf, tb) = mlx_times(ours, *xs), torch_times(theirs, *xs)
        print(f"{name:32s} {mf:8.2f} {mb:8.2f} {tf:10.2f} {tb:8.2f}", flush=True)

    logits, targets = r(B * T, V), rng.integers(0, V, B * T)
    ce = mx.compile(mx.grad(lambda x: mx.mean(nn.losses.cross_entropy(x, mx.array(targets)))))
    torch_logits = torch.from_numpy(logits).requires_grad_()
    print(f"{'cross-entropy fwd+bwd':32s} {cpu_ms(lambda: mx.eval(ce(mx.array(logits)))):17.2f} "
          f"{cpu_ms(lambda: F.cross_entropy(torch_logits, torch.from_numpy(targets)).backward()):19.2f}")
    h = r(B, T, D)
    dropout = mx.compile(lambda x: nn.Dropout(0.1)(x))
    print(f"{'dropout 0.1 fwd':32s} {cpu_ms(lambda: mx.eval(dropout(mx.array(h)))):8.2f} "
          f"{cpu_ms(lambda: F.dropout(torch.from_numpy(h), 0.1, True)):19.2f}")

    model = zoo.build("gpt2", seed=0, vocab_size=V, d_model=D, n_layers=4, n_heads=H, max_positions=T,
                      activation="gelu")
    opt = AdamW(3e-3, weight_decay=0.1)
    opt.init(model.trainable_parameters())
    grads = tree_map(lambda p: mx.full(p.shape, 1e-3), model.trainable_parameters())
    state = [model.state, opt.state]

    def apply(g):
        opt.update(model, optim.clip_grad_norm(g, 1.0)[0])
        return mx.array(0.0)

    update = mx.compile(apply, inputs=state, outputs=state)

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=4, n_head=H,
                                                              n_positions=T))
    params = list(hf.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    torch_opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95))

    def torch_update() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch_opt.step()

    print(f"{'AdamW + clipping, whole model':32s} {cpu_ms(lambda: mx.eval(update(grads), state)):8.2f} "
          f"{cpu_ms(torch_update):19.2f}")

    scores = mx.array(r(B, H, T, T) + causal)
    hidden = mx.array(r(B, T, FF))
    mx.eval(scores, hidden)
    ts, th = torch.from_numpy(np.array(scores)), torch.from_numpy(np.array(hidden))
    kernels = {
        "exp (scores)": (lambda: mx.eval(mx.exp(scores)), lambda: torch.exp(ts)),
        "fastmath.exp, compiled": (lambda: mx.eval(compiled_exp(scores)), lambda: torch.exp(ts)),
        "softmax (scores)": (lambda: mx.eval(mx.softmax(scores, axis=-1, precise=True)), lambda: torch.softmax(ts, -1)),
        "fastmath.softmax, compiled": (lambda: mx.eval(compiled_softmax(scores)), lambda: torch.softmax(ts, -1)),
        "erf (hidden)": (lambda: mx.eval(mx.erf(hidden)), lambda: torch.erf(th)),
        "GELU (hidden)": (lambda: mx.eval(nn.gelu(hidden)), lambda: F.gelu(th)),
        "tanh (hidden)": (lambda: mx.eval(mx.tanh(hidden)), lambda: torch.tanh(th)),
        "multiply (scores)": (lambda: mx.eval(scores * 1.5), lambda: ts * 1.5),
    }
    compiled_exp, compiled_softmax = mx.compile(fastmath.exp), mx.compile(fastmath.softmax)
    print(f"\n{'kernel alone, forward':32s} {'MLX':>8s} {'torch':>19s}  (CPU ms)")
    for name, (ours, theirs) in kernels.items():
        print(f"{name:32s} {cpu_ms(ours):8.2f} {cpu_ms(theirs):19.2f}", flush=True)


if __name__ == "__main__":
    main()
