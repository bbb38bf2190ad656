"""Perplexity (or mean KL) of each cache over ranges of positions, from a study.json's windows.

    python tools/study_ranges.py docs/studies/stories260k-10k.json 1-512 513-2048 2049-10000
    python tools/study_ranges.py --kl docs/studies/stories260k-quantized.json 1-512 513-2048

A range is made of the whole windows inside it (windows are `settings.window` positions long), so
the perplexity over it is exact: exp of the mean of the windows' log-perplexities weighted by
their sizes. Prints one row per model x cache.
"""

from __future__ import annotations

import json
import math
import sys


def over(windows: list[dict], start: int, stop: int) -> float:
    inside = [w for w in windows if w["start"] >= start and w["stop"] <= stop + 1]
    n = sum(w["stop"] - w["start"] for w in inside)
    if n == 0:
        return float("nan")
    return math.exp(sum(math.log(w["ppl"]) * (w["stop"] - w["start"]) for w in inside) / n)


def mean_kl(windows: list[dict], start: int, stop: int) -> float:
    inside = [w for w in windows if w["start"] >= start and w["stop"] <= stop + 1]
    n = sum(w["stop"] - w["start"] for w in inside)
    return sum(w["kl_mean"] * (w["stop"] - w["start"]) for w in inside) / n if n else float("nan")


def main_kl(path: str, ranges: list[str]) -> None:
    with open(path) as f:
        result = json.load(f)
    bounds = [tuple(int(x) for x in r.split("-")) for r in ranges]
    print("model".ljust(28), "cache".ljust(34), "  ".join(r.rjust(11) for r in ranges), " whole".rjust(9))
    for model in result["models"]:
        for r in model["runs"]:
            cells = "  ".join(f"{mean_kl(r.get('kl_windows') or [], a, b):11.5f}" for a, b in bounds)
            whole = (r.get("quality") or {}).get("kl_mean")
            print(model["path"].split("/")[-1][:28].ljust(28), r["cache"][:34].ljust(34), cells,
                  f"{whole:9.5f}" if whole is not None else "")


def main(path: str, ranges: list[str]) -> None:
    with open(path) as f:
        result = json.load(f)
    bounds = [tuple(int(x) for x in r.split("-")) for r in ranges]
    print("model".ljust(28), "cache".ljust(34), "  ".join(r.rjust(11) for r in ranges), " whole".rjust(9))
    for model in result["models"]:
        rows = [(model["baseline"]["cache"] + " (exact)", model["baseline"]["ppl_windows"], model["baseline"]["ppl"])]
        rows += [(r["cache"], r.get("ppl_windows") or [], (r.get("quality") or {}).get("ppl")) for r in model["runs"]]
        for label, windows, whole in rows:
            cells = "  ".join(f"{over(windows, a, b):11.3f}" for a, b in bounds)
            print(model["path"].split("/")[-1][:28].ljust(28), label[:34].ljust(34), cells,
                  f"{whole:9.3f}" if whole is not None else "")


if __name__ == "__main__":
    args = sys.argv[1:]
    kl = bool(args) and args[0] == "--kl"
    args = args[1:] if kl else args
    if len(args) < 2:
        sys.exit(__doc__)
    (main_kl if kl else main)(args[0], args[1:])
