"""`kvzoo bench --vs-llamacpp`: kvzoo and mlx-lm against llama.cpp's `llama-bench` on one GGUF.

For each GGUF file (given with `--gguf`, or written with gguf-py from the `llama` config's
random weights in each `--file-types` type), in alternating rounds:

- kvzoo: `zoo.load_model(file)` (dtype "auto": float32 on the CPU, the fast path for every GGUF
  type there), the preallocated cache, `zoo.generate_step` (the bench's own timers);
- mlx-lm: the same arrays in mlx-lm's model class (`to_mlx_lm`), its KVCache and generate_step;
- llama.cpp: `llama-bench -m FILE -t THREADS -r 1 -o json`, prefill as `-p P -n 0` and decode as
  `-p 0 -n N -d P` (N tokens generated at context depth P: after a P-token prompt, as the other
  two decode), one run per round.

Prefill is P prompt tokens per second to the first token; decode is tokens per second after it.
Medians over the rounds; ratios are against llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx

from .bench import Side, _first_dtype, kvzoo_side, mlx_lm_side, time_decode, time_prefill


def find_llama_bench(given: Optional[str]) -> Path:
    """The llama-bench binary: `given` (a path, or a name looked up on PATH), else llama-bench
    on PATH; ValueError saying how to get one when there is none."""
    name = given or "llama-bench"
    found = shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK) else None)
    if found is None:
        raise ValueError(
            f"--vs-llamacpp: no executable {name!r} "
            f"({'not on PATH' if os.sep not in name else 'no such executable file'}); build llama.cpp "
            f"(cmake -B build && cmake --build build --target llama-bench) and pass "
            f"--vs-llamacpp path/to/build/bin/llama-bench")
    return Path(found)


def llama_bench(binary: Path, gguf: Path, *, prompt: int, tokens: int, depth: int, threads: int) -> float:
    """Tokens/s of one llama-bench test: prefill (`tokens=0`) or decode at `depth`."""
    command = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
               "-p", str(prompt), "-n", str(tokens)]
    if depth:
        command += ["-d", str(depth)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    try:
        results = json.loads(done.stdout)
        return float(results[0]["avg_ts"])
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise RuntimeError(f"unexpected llama-bench output ({error}): {done.stdout[:400]!r}") from None


def _sides(model) -> dict[str, Side]:
    from mlx_lm.models.cache import KVCache

    from ..checkpoints.mlx_lm import to_mlx_lm

    return {"kvzoo": kvzoo_side(model, "preallocated", {}), "mlx-lm": mlx_lm_side(to_mlx_lm(model), KVCache)}


def bench_file(gguf: Path, binary: Path, *, prompt: int, tokens: int, rounds: int, threads: int,
               progress: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """One row: prefill and decode tokens/s of kvzoo, mlx-lm and llama.cpp on `gguf`, medians."""
    from ..checkpoints.loading import load_model

    model = load_model(gguf)
    sides = _sides(model)
    tokens_in = mx.random.randint(3, model.config.vocab_size, (prompt,), key=mx.random.key(0)).astype(mx.int32)
    measure: dict[str, dict[str, Callable[[], float]]] = {"prefill": {}, "decode": {}}
    for name, side in sides.items():
        measure["prefill"][name] = lambda side=side: prompt / time_prefill(side, tokens_in)
        measure["decode"][name] = lambda side=side: 1.0 / time_decode(side, tokens_in, tokens)
    measure["prefill"]["llama.cpp"] = lambda: llama_bench(binary, gguf, prompt=prompt, tokens=0, depth=0,
                                                          threads=threads)
    measure["decode"]["llama.cpp"] = lambda: llama_bench(binary, gguf, prompt=0, tokens=tokens, depth=prompt,
                                                         threads=threads)
    for stage in measure.values():  # warm-up: compile, allocate, page the file in
        for name, fn in stage.items():
            if name != "llama.cpp":
                fn()
    runs: dict[str, dict[str, list[float]]] = {s: {n: [] for n in m} for s, m in measure.items()}
    for r in range(rounds):
        for stage, fns in measure.items():
            for name, fn in fns.items():
                runs[stage][name].append(fn())
                mx.clear_cache()
        progress(f"{gguf.name} round {r + 1}/{rounds}")
    row: dict[str, Any] = {"file": str(gguf), "params": model.n_params, "prompt": prompt, "tokens": tokens,
                           "rounds": rounds, "threads": threads, "kvzoo_dtype": str(_first_dtype(model)), "runs": runs}
    for stage, by_side in runs.items():
        medians = {name: statistics.median(values) for name, values in by_side.items()}
        row[stage] = medians
        row[stage + "_ratio"] = {name: medians[name] / medians["llama.cpp"]
                                 for name in medians if name != "llama.cpp"}
    return row


def written_files(folder: Path, *, quick: bool, file_types: list[str], seed: int = 0) -> list[Path]:
    """The `llama` config's random weights (the 100M "small" preset; "tiny" when quick) written
    as GGUF once per file type."""
    from ..checkpoints.gguf_write import write_gguf
    from ..registry import build

    model = build("llama", preset="tiny" if quick else "small", seed=seed,
                  **({"vocab_size": 512, "max_positions": 1024} if quick else {}))
    return [write_gguf(model, folder / f"llama-{'tiny' if quick else 'small'}-{t}.gguf", t) for t in file_types]


def run(binary: Optional[str], files: Optional[list[str]], *, file_types: list[str], quick: bool,
        prompt: Optional[int], tokens: Optional[int], rounds: Optional[int], threads: Optional[int],
        progress: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """The --vs-llamacpp section: one row per GGUF file."""
    llama = find_llama_bench(binary)
    threads = threads or os.cpu_count() or 1
    settings = dict(prompt=prompt or (128 if quick else 512), tokens=tokens or (32 if quick else 128),
                    rounds=rounds or (2 if quick else 3), threads=threads)
    for name in ("prompt", "tokens", "rounds"):
        if settings[name] < 1:
            raise ValueError(f"--vs-llamacpp: {name} must be >= 1, got {settings[name]}")
    paths = [Path(f) for f in files] if files else None
    for p in paths or []:
        if not p.is_file() or p.suffix != ".gguf":
            raise ValueError(f"--gguf {p}: not a .gguf file")
    with tempfile.TemporaryDirectory(prefix="kvzoo-gguf-") as tmp:
        if paths is None:
            paths = written_files(Path(tmp), quick=quick, file_types=file_types)
        rows = [bench_file(p, llama, progress=progress, **settings) for p in paths]
    return {"llama_bench": str(llama), "settings": settings, "rows": rows,
            "cache": "preallocated (kvzoo), KVCache (mlx-lm)"}


def format_rows(section: dict[str, Any]) -> str:
    lines = [f"against llama.cpp ({section['llama_bench']}, {section['settings']['threads']} threads, "
             f"medians of {section['settings']['rounds']} alternating rounds)",
             f"{'file':32} {'stage':8} {'kvzoo':>9} {'mlx-lm':>9} {'llama.cpp':>10} {'kvzoo/l.cpp':>12} {'mlx-lm/l.cpp':>13}"]
    for row in section["rows"]:
        for stage in ("prefill", "decode"):
            m, r = row[stage], row[stage + "_ratio"]
            lines.append(f"{Path(row['file']).name[:32]:32} {stage:8} {m['kvzoo']:9.1f} {m['mlx-lm']:9.1f} "
                         f"{m['llama.cpp']:10.1f} {r['kvzoo']:11.2f}x {r['mlx-lm']:12.2f}x")
    lines.append(f"(tokens/s; prefill = prompt {section['settings']['prompt']}, decode = "
                 f"{section['settings']['tokens']} tokens after it; kvzoo runs every GGUF type as float32 on the CPU)")
    return "\n".join(lines)
