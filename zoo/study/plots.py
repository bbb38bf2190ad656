"""PNG plots of a study result (needs matplotlib; the study runs without it).

- ppl_vs_position.png: perplexity per window of positions, one line per cache, a panel per model
  (StreamingLLM's figure: where a window cache departs from the exact one);
- kl_vs_bytes.png: mean KL against the exact cache vs cache bytes per token at the largest
  context, a point per cache (kvpress's score vs compression);
- needle_<model>.png: passkey accuracy heat maps (context x depth), a panel per cache;
- cost_vs_context.png: decode tokens/s (the fastest timed step: on a shared machine the least
  disturbed) and cache bytes against context, per cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _name(model: dict) -> str:
    return Path(model["path"]).name or model["path"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _series(model: dict) -> list[tuple[str, dict]]:
    """(label, run-like dict) for the baseline and every run."""
    base = model["baseline"]
    return [(f"{base['cache']} (exact baseline)", base)] + [(r["cache"], r) for r in model["runs"]]


def _panels(n: int, width: float = 6.0, height: float = 4.0):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def plot_ppl_vs_position(result: dict, path: Path) -> Path:
    models = result["models"]
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models):
        for label, run in _series(model):
            points = run.get("ppl_windows") or []
            if points:
                ax.plot([(p["start"] + p["stop"] - 1) / 2 for p in points], [p["ppl"] for p in points],
                        marker=".", label=label)
        ax.set_title(f"{_name(model)} ({model['positional']}, {model['layout']})")
        ax.set_xlabel("position (window centre)")
        ax.set_ylabel(f"perplexity per {result['settings']['window']} tokens")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_kl_vs_bytes(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in result["models"]:
        xs, ys, labels = [], [], []
        for run in model["runs"]:
            points = (run.get("cost") or {}).get("points") or []
            quality = run.get("quality") or {}
            if points and quality.get("kl_mean") is not None:
                xs.append(points[-1]["bytes_per_token"])
                ys.append(quality["kl_mean"])
                labels.append(run["cache"])
        if xs:
            ax.scatter(xs, ys, label=_name(model))
            for x, y, label in zip(xs, ys, labels):
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_ylim(bottom=0)  # KL >= 0: no negative decades
    ax.set_xlabel("cache bytes per context token (largest context)")
    ax.set_ylabel("mean KL(exact || cache), nats")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_needle(model: dict, path: Path) -> Path:
    grids = [(label, run.get("needle")) for label, run in _series(model)]
    grids = [(label, g) for label, g in grids if g and g.get("cells")]
    fig, axes = _panels(len(grids), width=3.6, height=3.2)
    for ax, (label, grid) in zip(axes, grids):
        contexts = sorted({c["context"] for c in grid["cells"]})
        depths = sorted({c["depth"] for c in grid["cells"]})
        table = [[float("nan")] * len(contexts) for _ in depths]
        for c in grid["cells"]:
            table[depths.index(c["depth"])][contexts.index(c["context"])] = c["accuracy"]
        image = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(label, fontsize=8)
    fig.colorbar(image, ax=axes, label="passkey accuracy")
    fig.suptitle(_name(model), fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_cost(result: dict, path: Path) -> Path:
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in result["models"]:
        for label, run in _series(model):
            points = (run.get("cost") or {}).get("points") or []
            if not points:
                continue
            name = f"{_name(model)}: {label}" if len(result["models"]) > 1 else label
            contexts = [p["context"] for p in points]
            rates = [p.get("decode_tokens_per_s_best", p["decode_tokens_per_s"]) for p in points]
            speed.plot(contexts, rates, marker=".", label=name)
            memory.plot(contexts, [p["bytes"] for p in points], marker=".", label=name)
    for ax, what in ((speed, "decode tokens/s (fastest step)"), (memory, "cache bytes")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(what)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(result: dict[str, Any], folder: Path) -> list[Path]:
    """Every plot the result has data for, written into `folder`; the paths."""
    folder = Path(folder)
    paths = [plot_ppl_vs_position(result, folder / "ppl_vs_position.png")]
    if any((r.get("cost") or {}).get("points") for m in result["models"] for r in m["runs"]):
        paths.append(plot_kl_vs_bytes(result, folder / "kl_vs_bytes.png"))
    if any((m["baseline"].get("cost") or {}).get("points") for m in result["models"]):
        paths.append(plot_cost(result, folder / "cost_vs_context.png"))
    for i, model in enumerate(result["models"]):
        if any((run.get("needle") or {}).get("cells") for _, run in _series(model)):
            paths.append(plot_needle(model, folder / f"needle_{i}_{_slug(_name(model))}.png"))
    return paths
