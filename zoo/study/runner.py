"""`zoo.study(...)`: a grid of models x caches over one text, every number in one JSON.

For each model (any `zoo.load`-able path) and each cache spec (spec.py), on the text's tokens:

- conformance: the kit (`caches.conformance.check`) on the first tokens, so every number below
  is for a cache proven to match its declared reference on this very model;
- quality: teacher-forced perplexity through the cache, per window of positions, and against the
  exact baseline cache in lockstep (mean / p99 KL, top-1 agreement, delta perplexity);
- retrieval: the passkey grid (context x depth), run for every cache only when the model
  retrieves at all through the baseline cache (otherwise: which model cannot, and why);
- cost: cache bytes, held tokens, decode and prefill tokens/s against context, peak bytes.

    result = zoo.study(["stories260K.gguf"], "story.txt", ["concat", "rotating:max_size=64:keep=4"],
                       out="study/", quick=True)

writes study/study.json (the returned dict) and PNG plots (with matplotlib), prints a table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import caches
from caches import conformance

from .compare import compare, summarize, windowed_kl
from .cost import cost_sweep
from .needle import needle_grid
from .perplexity import perplexity, windows
from .progress import Progress
from .spec import CacheSpec, expand, parse_list

SCHEMA = 1


@dataclass
class Settings:
    """Everything a study run depends on besides models, text and caches (all in study.json)."""

    max_tokens: Optional[int] = None  # of the text, after tokenizing (None: all of it)
    chunk: int = 256  # tokens per forward when teacher forcing
    prefill: Optional[int] = None  # teacher-force only this many in chunks, then one token per forward
    window: int = 128  # scored tokens per perplexity window
    baseline: Optional[str] = None  # the exact cache to compare with (None: the model's default)
    conformance_tokens: int = 64  # prompt of the conformance check (plus 8 decode steps)
    needle: bool = True
    needle_contexts: tuple = (256, 512, 1024)
    needle_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_trials: int = 2
    cost: bool = True
    contexts: tuple = (128, 256, 512, 1024, 2048)
    decode: int = 16  # timed decode steps per context
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> "Settings":
        """Seconds per model on tiny models: what CI runs."""
        base = dict(max_tokens=256, chunk=64, window=32, conformance_tokens=24, needle_contexts=(192, 256),
                    needle_depths=(0.0, 1.0), needle_trials=1, contexts=(32, 128), decode=4)
        return cls(**{**base, **overrides})


@dataclass
class _Job:
    spec: CacheSpec
    label: str
    error: Optional[str] = None
    result: dict = field(default_factory=dict)


def _specs(caches_arg: Union[str, Iterable[Union[str, CacheSpec]]]) -> list[CacheSpec]:
    if isinstance(caches_arg, str):
        return parse_list(caches_arg)
    out: list[CacheSpec] = []
    for item in caches_arg:
        for spec in ([item] if isinstance(item, CacheSpec) else expand(item)):
            if spec not in out:
                out.append(spec)
    if not out:
        raise ValueError("the study needs at least one cache spec")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def environment() -> dict[str, Any]:
    """Versions, device, BLAS (`kvzoo info`'s report) and the machine: cores, load."""
    from ..cli.info import collect

    info = collect(measure=False)
    info["machine"] = {
        "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:12],
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info


def study(models: Union[str, Sequence[str]], text: Union[str, Path],
          caches: Union[str, Iterable[Union[str, CacheSpec]]], *, out: Union[str, Path, None] = None,
          quick: bool = False, settings: Optional[Settings] = None, progress: bool = True,
          plots: bool = True, table: bool = False) -> dict[str, Any]:
    """Run the grid; return (and with `out`, write to out/study.json) every number and setting.

    models: paths `zoo.load` reads. text: a UTF-8 text file. caches: spec strings ("concat",
    "rotating:max_size=64:keep=4", value lists "rotating:max_size=32/64") or CacheSpecs, or one
    comma-separated string. quick: `Settings.quick()` unless `settings` is given.
    """
    models = [models] if isinstance(models, (str, Path)) else list(models)
    if not models:
        raise ValueError("the study needs at least one model path")
    specs = _specs(caches)
    settings = settings or (Settings.quick() if quick else Settings())
    baseline = expand(settings.baseline)[0] if settings.baseline else None
    text_path = Path(text)
    if not text_path.is_file():
        raise FileNotFoundError(f"text file {text_path} not found")
    content = text_path.read_text(encoding="utf-8")
    if not content.strip():
        raise ValueError(f"text file {text_path} is empty")

    started = time.time()
    bar = Progress(enabled=progress)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "settings": {**dataclasses.asdict(settings), "quick": quick},
        "caches": [spec.label for spec in specs],
        "text": {"path": str(text_path), "sha256": _sha256(text_path), "bytes": text_path.stat().st_size,
                 "characters": len(content)},
        "environment": environment(),
        "models": [],
    }
    for path in models:
        result["models"].append(study_model(path, content, specs, settings, baseline, bar))
    bar.close()
    result["seconds"] = time.time() - started
    if out is not None:
        write(result, out, plots=plots)
    if table:
        print(format_table(result))
    return result


def _baseline_spec(model: Any, baseline: Optional[CacheSpec]) -> CacheSpec:
    if baseline is not None:
        return baseline
    from ..generate import default_cache

    name, options = default_cache(model)
    return CacheSpec(name, options)


def _conformance(model: Any, spec: CacheSpec, tokens: list[int], seq_len: int) -> dict[str, Any]:
    from ..cli.check import uneven_chunks

    report = conformance.check(model, lambda: spec.make(model), tokens, chunks=uneven_chunks(len(tokens)),
                               decode=8)
    return {
        "ok": report.ok,
        "max_abs_diff": report.exact_diff,
        "tolerance": report.tolerance,
        "greedy_agree": f"{report.greedy_agree}/{report.greedy_steps}",
        "rounding_flips": report.rounding_flips,
        "problem": "; ".join(([report.problem] if report.problem else []) + list(report.storage)
                             + list(getattr(report, "rows", []))) or None,
        "prompt_tokens": len(tokens),
        "exact_vs_true_model_over_text": caches.exact_for(spec.name, seq_len=seq_len, **spec.options),
        "reference": repr(caches.reference_of(spec.name, **spec.options)),
    }


def _guarded(stage: Any) -> dict[str, Any]:
    """A stage's result, or {"error": why} when the cache refused the work (a full fixed buffer,
    a chunk it cannot take): one cache's limit never stops the study."""
    try:
        return stage()
    except (ValueError, TypeError, NotImplementedError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def study_model(path: str, content: str, specs: list[CacheSpec], settings: Settings,
                baseline: Optional[CacheSpec], bar: Progress) -> dict[str, Any]:
    """Every cache spec on one model (see the module docstring)."""
    from ..checkpoints import load

    started = time.time()
    model, tokenizer = load(path)
    cfg = model.config
    tokens = tokenizer.encode(content)
    notes = []
    if settings.max_tokens is not None and len(tokens) > settings.max_tokens:
        tokens = tokens[: settings.max_tokens]
    limit = model.positional.max_positions
    if limit is not None and len(tokens) > limit:
        notes.append(f"text cut from {len(tokens)} to {limit} tokens: the model's {cfg.positional} "
                     f"positions end there")
        tokens = tokens[:limit]
    base = _baseline_spec(model, baseline)
    base_exact = caches.exact_for(base.name, seq_len=len(tokens), **base.options)
    if not base_exact and base != _baseline_spec(model, None):  # the default is the model's own
        notes.append(f"baseline {base.label} is not exact against the true model over {len(tokens)} "
                     f"tokens: KL and delta perplexity are against it, not against the model")
    jobs = [_Job(spec, spec.label) for spec in specs]
    for job in jobs:  # the cache must be able to serve this model
        try:
            job.spec.make(model)
        except (ValueError, TypeError) as error:
            job.error = str(error)
    live = [job for job in jobs if job.error is None]
    n = len(tokens)
    bar.label = Path(path).name
    conf_tokens = tokens[: min(settings.conformance_tokens, n)]
    needle_units = (sum(settings.needle_contexts) * len(settings.needle_depths) * settings.needle_trials
                    if settings.needle else 0)
    cost_units = (max(settings.contexts) + settings.decode * len(settings.contexts)) if settings.cost else 0
    check_units = 8 * len(conf_tokens)  # the kit's forwards, roughly, in tokens
    bar.add(n * (1 + len(live)) + (needle_units + cost_units) * (1 + len(live)) + check_units * len(live))

    for job in live:
        job.result["conformance"] = _guarded(lambda: _conformance(model, job.spec, conf_tokens, n))
        bar.step(check_units, f"{Path(path).name} check {job.label}")

    # quality, in lockstep with the baseline
    comparison = compare(model, tokens, base.make(model), {job.label: job.spec.make(model) for job in live},
                         chunk=settings.chunk, prefill=settings.prefill,
                         progress=lambda k: bar.step(k, f"{Path(path).name} perplexity"))
    base_ppl = perplexity(comparison.base_nll)
    for job in live:
        run = comparison.tests[job.label]
        job.result["quality"] = summarize(comparison.base_nll, run)
        job.result["ppl_windows"] = windows(run.nll[: run.scored], settings.window) if run.scored else []
        job.result["kl_windows"] = windowed_kl(run, settings.window)

    # retrieval
    needle: dict[str, Any] = {}
    if settings.needle:
        def grid(spec: CacheSpec) -> dict[str, Any]:
            return needle_grid(model, tokenizer, lambda: spec.make(model), settings.needle_contexts,
                               settings.needle_depths, trials=settings.needle_trials, seed=settings.seed,
                               chunk=settings.chunk, max_positions=limit,
                               progress=lambda k: bar.step(k, f"{Path(path).name} needle {spec.label}"))

        needle["baseline"] = grid(base)
        cells = needle["baseline"]["cells"]
        needle["able"] = any(c["accuracy"] > 0 for c in cells)
        if not cells:
            needle["reason"] = "no context length fits the passkey prompt and the model's positions"
        elif not needle["able"]:
            needle["reason"] = (f"retrieves no passkey through the exact cache at any context "
                                f"({', '.join(str(c) for c in sorted({c['context'] for c in cells}))}) "
                                f"or depth; the caches' grids are not run")
            bar.step(needle_units * len(live))
        for job in live:
            if needle["able"]:
                job.result["needle"] = _guarded(lambda: grid(job.spec))

    # cost
    cost: dict[str, Any] = {}
    if settings.cost:
        def sweep(spec: CacheSpec) -> dict[str, Any]:
            return cost_sweep(model, tokens, lambda: spec.make(model), settings.contexts, decode=settings.decode,
                              chunk=settings.chunk, max_positions=limit,
                              progress=lambda k: bar.step(k, f"{Path(path).name} cost {spec.label}"))

        cost = sweep(base)
        for job in live:
            job.result["cost"] = _guarded(lambda: sweep(job.spec))

    return {
        "path": str(path),
        "family": cfg.family,
        "positional": cfg.positional,
        "layout": cfg.layout,
        "config": cfg.to_dict(),
        "params": model.n_params,
        "tokens": n,
        "scored_tokens": n - 1,
        "notes": notes,
        "baseline": {"cache": base.label, "ppl": base_ppl, "peak_bytes": comparison.base_peak_bytes,
                     "ppl_windows": windows(comparison.base_nll, settings.window), "cost": cost,
                     "needle": needle.get("baseline")},
        "needle": {k: v for k, v in needle.items() if k != "baseline"},
        "runs": [{"cache": job.label, "name": job.spec.name, "options": job.spec.options, **job.result}
                 for job in live],
        "skipped": [{"cache": job.label, "reason": job.error} for job in jobs if job.error is not None],
        "seconds": time.time() - started,
    }


def write(result: dict[str, Any], out: Union[str, Path], *, plots: bool = True) -> list[Path]:
    """study.json (and the plots, when matplotlib is there) into `out`; the paths written."""
    import json

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "study.json"]
    if plots:
        try:
            from .plots import plot_all
        except ImportError as error:  # matplotlib missing
            result["plots"] = {"error": f"no plots: {error} (pip install matplotlib)"}
        else:
            paths = plot_all(result, folder)
            result["plots"] = [p.name for p in paths]
            written += paths
    with open(folder / "study.json", "w") as f:
        json.dump(result, f, indent=1, allow_nan=False, default=_json_default)
        f.write("\n")
    return written


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to study.json")


def format_table(result: dict[str, Any]) -> str:
    """One row per model x cache: quality, retrieval and cost at a glance."""
    header = ["model", "cache", "check", "ppl", "Δppl", "KL mean", "KL p99", "top-1", "B/token",
              "peak B", "decode t/s", "prefill t/s", "needle"]
    rows = []
    for m in result["models"]:
        name = Path(m["path"]).name
        b = m["baseline"]
        rows.append([name, f"{b['cache']} (baseline)", "-", f"{b['ppl']:.3f}", "", "", "", "",
                     *_cost_cells(b.get("cost")), _needle_cell(b.get("needle"))])
        for r in m["runs"]:
            q = r.get("quality", {})
            ok = r.get("conformance", {}).get("ok")
            rows.append([name, r["cache"], {True: "ok", False: "FAIL"}.get(ok, "n/a"),
                         _f(q.get("ppl"), ".3f"), _f(q.get("delta_ppl"), "+.3f"), _f(q.get("kl_mean"), ".4f"),
                         _f(q.get("kl_p99"), ".4f"), _f(q.get("top1_agreement"), ".1%"),
                         *_cost_cells(r.get("cost")), _needle_cell(r.get("needle"))])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    notes = [f"{Path(m['path']).name}: {note}" for m in result["models"] for note in m["notes"]]
    notes += [f"{Path(m['path']).name}: {s['cache']} not run: {s['reason']}" for m in result["models"]
              for s in m["skipped"]]
    notes += [f"{Path(m['path']).name}: needle: {m['needle']['reason']}" for m in result["models"]
              if m["needle"].get("reason")]
    notes += [f"{Path(m['path']).name}: {r['cache']}: {stage} stopped: {r[stage]['error']}"
              for m in result["models"] for r in m["runs"] for stage in ("conformance", "needle", "cost")
              if isinstance(r.get(stage), dict) and r[stage].get("error")]
    notes += [f"{Path(m['path']).name}: {r['cache']}: perplexity {r['quality']['error']}"
              for m in result["models"] for r in m["runs"] if (r.get("quality") or {}).get("error")]
    return "\n".join(line.rstrip() for line in lines + notes)


def _f(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _cost_cells(cost: Optional[dict]) -> list[str]:
    if not cost or not cost.get("points"):
        return ["", "", "", ""]
    last = cost["points"][-1]
    return [f"{last['bytes_per_token']:,.0f}", f"{cost['peak_bytes']:,}",
            f"{last['decode_tokens_per_s']:,.0f}@{last['context']}", _f(cost["prefill_tokens_per_s"], ",.0f")]


def _needle_cell(grid: Optional[dict]) -> str:
    if not grid or not grid.get("cells"):
        return ""
    cells = grid["cells"]
    return f"{sum(c['accuracy'] for c in cells) / len(cells):.0%}"
