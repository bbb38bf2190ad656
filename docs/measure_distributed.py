"""The numbers of docs/distributed.md: on paper for 7B and 70B Llama shapes, and measured for
one process against two local processes (mlx.launch --backend ring -n 2) on this machine.

    python docs/measure_distributed.py                 # both; writes docs/distributed.json
    python docs/measure_distributed.py --paper         # the formulas' tables only (instant)

The measured model is a random-weight llama "small" preset (12 layers, d_model 768, 12 heads,
4 kv heads, SwiGLU 2048, vocab 32000; ~100M parameters, fp32, init std 0.1 so that greedy
decoding does not repeat one token), saved as an HF folder and
loaded by each process through zoo.load_model(folder, group=) (sliced while reading). Every
process reports its own weight bytes, cache bytes and peak memory; rank 0 its speed. On two
shared CPU cores two processes cannot be faster than one: the point is the memory per process
and that the tokens are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# -- on paper -------------------------------------------------------------------------------

SHAPES = {  # Llama 2 7B (MHA) and Llama 3 70B (GQA 64/8); fp16 weights, activations and cache
    "7B": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, d_ff=11008, vocab=32000, tied=False),
    "70B": dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, d_ff=28672, vocab=128256, tied=False),
}
LINKS = {  # (latency per hop in seconds, bandwidth in bytes/s)
    "10 GbE (TCP)": (50e-6, 1.25e9),
    "Thunderbolt 5 / 80 Gb/s": (10e-6, 10e9),
}
BYTES = 2  # fp16
MACHINE_BANDWIDTH = 400e9  # bytes/s of memory bandwidth per machine (an M-series Max class)
MACHINE_MEMORY = 64e9  # bytes per machine


def block_params(s: dict) -> int:
    attn = s["d_model"] * s["head_dim"] * (2 * s["n_heads"] + 2 * s["n_kv_heads"])
    mlp = 3 * s["d_model"] * s["d_ff"]
    return attn + mlp


def replicated_params(s: dict) -> int:
    return s["vocab"] * s["d_model"] * (1 if s["tied"] else 2) + (2 * s["n_layers"] + 1) * s["d_model"]


def kv_heads_per_process(s: dict, n: int) -> int:
    return s["n_kv_heads"] // n if s["n_kv_heads"] % n == 0 else 1  # else each copies its one


def paper(s: dict, n: int, link: tuple[float, float]) -> dict:
    """Per-token decode time (batch 1) and cache capacity for N processes, one per machine.

    compute: decode is memory-bound: each process reads its weights and its cache per token;
    communication: 2 all-sums per layer of d_model values; a ring all-reduce of M bytes over N
    processes takes 2 (N - 1) steps of latency alpha and moves 2 (N - 1) / N * M bytes per link.
    """
    alpha, beta = link
    weights = (block_params(s) * s["n_layers"] / n + replicated_params(s)) * BYTES
    message = s["d_model"] * BYTES
    allreduce = 0.0 if n == 1 else 2 * (n - 1) * alpha + 2 * (n - 1) / n * message / beta
    comm = 2 * s["n_layers"] * allreduce
    cache_per_token = 2 * s["n_layers"] * kv_heads_per_process(s, n) * s["head_dim"] * BYTES
    context = 4096
    compute = (weights + context * cache_per_token) / MACHINE_BANDWIDTH
    free = MACHINE_MEMORY * 0.9 - weights
    return dict(n=n, weights_gb=weights / 1e9, compute_ms=compute * 1e3, comm_ms=comm * 1e3,
                tok_s=1 / (compute + comm), allsum_bytes=message, cache_kb_per_token=cache_per_token / 1e3,
                capacity_tokens=max(0, int(free / cache_per_token)) if free > 0 else 0)


def paper_tables() -> str:
    lines = []
    for name, s in SHAPES.items():
        lines.append(f"\n{name}: per token {2 * s['n_layers']} all-sums of {s['d_model'] * BYTES} bytes "
                     f"({2 * s['n_layers'] * s['d_model'] * BYTES / 1e3:.0f} KB), weights "
                     f"{(block_params(s) * s['n_layers'] + replicated_params(s)) * BYTES / 1e9:.1f} GB\n")
        lines.append("| N | link | weights/process GB | compute ms | all-sum ms | decode tok/s | cache KB/token/process | context fits/process |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for link_name, link in LINKS.items():
            for n in (1, 2, 4, 8, 16) if link_name == next(iter(LINKS)) else (2, 4, 8, 16):
                if s["n_heads"] % n:
                    continue
                p = paper(s, n, link)
                fits = f"{p['capacity_tokens']:,}" if p["capacity_tokens"] else "weights do not fit"
                lines.append(f"| {n} | {link_name if n > 1 else '-'} | {p['weights_gb']:.1f} | {p['compute_ms']:.1f} | "
                             f"{p['comm_ms']:.2f} | {p['tok_s']:.1f} | {p['cache_kb_per_token']:.0f} | {fits} |")
    return "\n".join(lines)


# -- measured -------------------------------------------------------------------------------

PROMPT, DECODE, ALLSUM_ROUNDS = 128, 64, 200


def worker(folder: str, out: str) -> None:
    """One process: load (its shard of) the model, prefill and decode greedily, report."""
    import mlx.core as mx

    import caches
    import zoo
    from zoo.distributed import all_sum, weight_bytes

    import resource

    def rss() -> int:  # the process's peak resident set so far (Linux: KiB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    group = mx.distributed.init()
    distributed = group.size() > 1
    rss_start = rss()
    mx.reset_peak_memory()
    started = time.perf_counter()
    model = zoo.load_model(folder, group=group if distributed else None)
    load_s = time.perf_counter() - started
    load_peak, rss_load = mx.get_peak_memory(), rss()
    prompt = [(7 * i + 3) % model.config.vocab_size for i in range(PROMPT)]
    cache = caches.make("preallocated", model)
    tokens, stamps = [], []
    started = time.perf_counter()
    for token, _ in zoo.generate_step(model, prompt, cache=cache, max_tokens=DECODE, prefill_step=PROMPT):
        tokens.append(int(token))
        stamps.append(time.perf_counter())
    report = dict(rank=group.rank(), size=group.size(), load_s=load_s, load_peak_bytes=load_peak,
                  weight_bytes=weight_bytes(model), cache_bytes=sum(c.nbytes for c in cache),
                  peak_bytes=mx.get_peak_memory(), prefill_tok_s=PROMPT / (stamps[0] - started),
                  decode_tok_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens=tokens,
                  rss_start_bytes=rss_start, rss_load_bytes=rss_load, rss_peak_bytes=rss())
    if distributed:
        x = mx.ones((1, 1, model.config.d_model))
        mx.eval(all_sum(x, group))
        started = time.perf_counter()
        for _ in range(ALLSUM_ROUNDS):
            mx.eval(all_sum(x, group))
        report["allsum_us"] = (time.perf_counter() - started) / ALLSUM_ROUNDS * 1e6
    Path(out, f"rank{group.rank()}-of-{group.size()}.json").write_text(json.dumps(report))


def free_port() -> int:
    """A loopback port p with p + 1 free too, for the two ring processes."""
    import socket

    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def measure() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp, "model"), Path(tmp, "out")
        out.mkdir()
        subprocess.run([sys.executable, "-c", "import sys, zoo; zoo.save(zoo.build('llama', preset='small', init_std=0.1), sys.argv[1])",
                        str(folder)], check=True, env=env, cwd=ROOT)
        me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder), str(out)]
        subprocess.run(me, check=True, env=env, cwd=ROOT)
        launcher = Path(sys.executable).with_name("mlx.launch")
        subprocess.run([str(launcher), "--backend", "ring", "-n", "2", "--starting-port", str(free_port()), "--", *me],
                       check=True, env=env, cwd=ROOT, timeout=1200)
        return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def measured_table(runs: dict) -> str:
    one, r0, r1 = runs["rank0-of-1"], runs["rank0-of-2"], runs["rank1-of-2"]
    mb = 1e6
    lines = ["| | 1 process | 2 processes: rank 0 | rank 1 |", "| --- | --- | --- | --- |"]
    for label, key, scale, fmt in [("weights (MB)", "weight_bytes", mb, ".1f"),
                                   (f"cache after {PROMPT}+{DECODE} tokens, preallocated (MB)", "cache_bytes", mb, ".2f"),
                                   ("MLX peak while loading (MB)", "load_peak_bytes", mb, ".1f"),
                                   ("MLX peak overall (MB)", "peak_bytes", mb, ".1f"),
                                   ("process RSS before loading: Python + libraries (MB)", "rss_start_bytes", mb, ".0f"),
                                   ("process peak RSS after loading (MB)", "rss_load_bytes", mb, ".0f"),
                                   ("process peak RSS at the end (MB)", "rss_peak_bytes", mb, ".0f"),
                                   ("prefill tok/s", "prefill_tok_s", 1, ".0f"),
                                   ("decode tok/s", "decode_tok_s", 1, ".1f")]:
        lines.append(f"| {label} | {one[key] / scale:{fmt}} | {r0[key] / scale:{fmt}} | {r1[key] / scale:{fmt}} |")
    lines.append(f"| all-sum of one token's activations (us) | - | {r0['allsum_us']:.0f} | {r1['allsum_us']:.0f} |")
    lines.append(f"\nsame greedy tokens: {one['tokens'] == r0['tokens'] == r1['tokens']} "
                 f"({len(set(one['tokens']))} distinct among {len(one['tokens'])})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="print the on-paper tables only")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    print(paper_tables())
    if args.paper:
        return
    runs = measure()
    load = os.getloadavg()
    print(f"\nmeasured ({os.cpu_count()} cores, load average {load[0]:.1f}):\n")
    print(measured_table(runs))
    (ROOT / "docs" / "distributed.json").write_text(json.dumps(dict(runs=runs, loadavg=load), indent=1) + "\n")


if __name__ == "__main__":
    main()
