"""Write OUT/README.txt: each trained model folder under OUT with its shape, parameters,
validation loss and training time (from its trainer_state.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: str) -> None:
    root = Path(out)
    lines = ["Trained kvzoo models (zoo.load(path) / kvzoo generate --model path).",
             "Recipe: scripts/train_study_models.sh in the kvzoo repository (branch training).",
             "Data: ../shared/data/corpora/tinystories-valid-part1.txt, last 10% held out for the",
             "validation loss (nats per token of the 512-piece SentencePiece tokenizer tok512.model).", ""]
    header = f"{'name':30} {'family':6} {'pos':8} {'layout':6} {'L':>2} {'d':>4} {'H':>2} {'KV':>2} " \
             f"{'ctx':>4} {'params':>9} {'steps':>5} {'train':>6} {'val':>6} {'minutes':>7}"
    lines += [header, "-" * len(header)]
    for state_file in sorted(root.glob("*/trainer_state.json")):
        state = json.loads(state_file.read_text())
        c, last = state["model_config"], state["history"][-1]
        layout = "MHA" if c["n_kv_heads"] == c["n_heads"] else ("MQA" if c["n_kv_heads"] == 1 else "GQA")
        minutes = (state.get("train_seconds") or 0) / 60
        lines.append(f"{state_file.parent.name:30} {c['family']:6} {c['positional']:8} {layout:6} "
                     f"{c['n_layers']:>2} {c['d_model']:>4} {c['n_heads']:>2} {c['n_kv_heads']:>2} "
                     f"{c['max_positions']:>4} {state['n_params']:>9,} {state['step']:>5} "
                     f"{last['train_loss']:>6.3f} {last['val_loss'] or float('nan'):>6.3f} {minutes:>7.1f}")
    lines += ["", "Loss curves: each folder's trainer_state.json ('history'); logs/ has the raw output.",
              "Schedule: every model the same --steps, warmup 50 and cosine to 3e-4 over those steps, the",
              "same seeded batches (STEPS=N scripts/train_study_models.sh OUT 0 0); 'minutes' is wall",
              "time on whatever machine ran them. The draft (ts512-rope-draft) shares the tokenizer",
              "with the others for speculative decoding."]
    (root / "README.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/models")
