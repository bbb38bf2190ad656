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
              "The machine was shared (load average 15-28 on 2 cores) while these trained: 150-450 tokens/s.",
              "Phase 1 ran 9 minutes each; phase 2 resumed every model to the same step count.",
              "CAUTION: these models are barely trained (60 steps of 8 x 256 tokens, ~0.5 epoch), and",
              "their losses differ mostly by their learning-rate paths (phase 1 gave each a different",
              "number of steps before its time-based cosine ended, then phase 2 restarted the warmup),",
              "not by their positional scheme or head layout. Use them for mechanics (caches, positions,",
              "layouts on a trained model), not to rank the schemes. The draft (ts512-rope-draft, 68",
              "steps, phase 1 only) shares the tokenizer with the others for speculative decoding.",
              "<name>-s100: copies continued to 100 steps (scripts/continue_study_models.sh; a fresh",
              "warmup + cosine over 100 steps from the 60-step weights); the originals are unchanged."]
    (root / "README.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/models")
