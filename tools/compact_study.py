"""Write a small copy of a study.json for docs/: floats to 4 significant digits, no indentation.

    python tools/compact_study.py /tmp/study/study.json docs/studies/name.json
"""

from __future__ import annotations

import json
import sys


def compact(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def main(source: str, target: str) -> None:
    with open(source) as f:
        result = json.load(f)
    with open(target, "w") as f:
        json.dump(compact(result), f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
