#!/usr/bin/env bash
# Continue the study models in copies: OUT/<name> -> OUT/<name>-s<STEPS>, resumed to STEPS
# optimizer steps (warmup + cosine over STEPS, step-based), three runs side by side. The
# originals stay as they were, so numbers already computed on them stay reproducible.
#   scripts/continue_study_models.sh [OUT=/work/models] [STEPS=100]
set -euo pipefail
OUT=${1:-/work/models}
STEPS=${2:-100}
DATA=${KVZOO_DATA:-/work/shared/data}/corpora/tinystories-valid-part1.txt
KVZOO=${KVZOO:-kvzoo}

continue_copy() {
  local name=$1 copy="$1-s$STEPS"
  if [ -f "$OUT/$copy/trainer_state.json" ]; then echo "$copy: exists"; return; fi
  rm -rf "$OUT/$copy.partial" && cp -r "$OUT/$name" "$OUT/$copy.partial"
  echo "$copy: resuming $name to step $STEPS ($(date -u +%H:%M:%S))"
  $KVZOO train --data "$DATA" --out "$OUT/$copy.partial" --resume --steps "$STEPS" --max-minutes 0 \
    --no-progress > "$OUT/logs/$copy.log" 2>&1
  mv "$OUT/$copy.partial" "$OUT/$copy"
  tail -n 1 "$OUT/logs/$copy.log"
}
(continue_copy ts512-rope; continue_copy ts512-alibi) &
(continue_copy ts512-learned; continue_copy ts512-rope-draft) &
(continue_copy ts512-rope-gqa; continue_copy ts512-rope-mqa) &
wait
python "$(dirname "$0")/study_models_readme.py" "$OUT"
