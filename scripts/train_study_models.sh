#!/usr/bin/env bash
# Trains the study models: small Llama-family models on TinyStories that differ in one thing at
# a time. Same tokenizer (stories260K's 512-piece SentencePiece, tok512.model), same size
# (d_model 96, 4 layers, 4 heads of 24, SwiGLU, tied, context 256), data, seed, batch, schedule:
#   positional scheme (MHA):   learned | rope | alibi
#   head layout (rope):        MHA (4 kv heads) | GQA (2) | MQA (1)
# plus a smaller draft model with the same tokenizer for speculative decoding.
# Phase 1: each run stops after MAX_MINUTES (the cosine schedule follows time when it does), in
# two chains side by side (PARALLEL=1 for one after the other). On the shared, overloaded CPU
# that was only 40-50 steps, a different number for each model; so phase 2 resumes every model
# to the same STEPS2 optimizer steps (same batches: the windows are seeded by step), with a
# fresh warmup + cosine over the STEPS2 steps (a warm restart), in three chains.
#
#   [STEPS=3000] scripts/train_study_models.sh [OUT_DIR=/work/models] [MAX_MINUTES=9] [STEPS2=60]
# (STEPS=N with MAX_MINUTES=0 and STEPS2=0: every model gets the same N-step schedule)
set -euo pipefail
OUT=${1:-/work/models}
MINUTES=${2:-9}
STEPS2=${3:-60}
ASSETS=${KVZOO_DATA:-/work/shared/data}
DATA=$ASSETS/corpora/tinystories-valid-part1.txt
TOKENIZER=$ASSETS/stories260K/tok512.model
KVZOO=${KVZOO:-kvzoo}
mkdir -p "$OUT/logs"

common=(--data "$DATA" --tokenizer "$TOKENIZER" --family llama --n-layers 4 --n-heads 4 --d-model 96
        --block-size 256 --batch-size 8 --steps "${STEPS:-3000}" --lr 3e-3 --min-lr 3e-4 --warmup 50
        --weight-decay 0.1 --grad-clip 1.0 --dropout 0 --eval-interval 50 --eval-batches 4
        --val-fraction 0.1 --seed 0 --max-minutes "$MINUTES" --no-progress)

train() {  # name, then the flags that make it differ
  local name=$1; shift
  if [ -f "$OUT/$name/trainer_state.json" ]; then echo "$name: already trained"; return; fi
  echo "$name: training ($(date -u +%H:%M:%S))"
  $KVZOO train "${common[@]}" "$@" --out "$OUT/$name" > "$OUT/logs/$name.log" 2>&1
  tail -n 1 "$OUT/logs/$name.log"
}

chain1() {
  train ts512-rope     --positional rope    --n-kv-heads 4
  train ts512-alibi    --positional alibi   --n-kv-heads 4
  train ts512-learned  --positional learned --n-kv-heads 4
}
chain2() {
  train ts512-rope-gqa --positional rope    --n-kv-heads 2
  train ts512-rope-mqa --positional rope    --n-kv-heads 1
  # the draft for speculative decoding (target: ts512-rope; same tokenizer)
  train ts512-rope-draft --positional rope --n-kv-heads 1 --n-layers 2 --d-model 48 --n-heads 2
}
if [ "${PARALLEL:-2}" = 1 ]; then chain1; chain2; else chain1 & chain2 & wait; fi

continue_to() {  # name: resume to STEPS2 steps, no time limit
  local name=$1 step
  step=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$OUT/$name/trainer_state.json")
  if [ "$step" -ge "$STEPS2" ]; then echo "$name: already at step $step"; return; fi
  echo "$name: resuming from step $step to $STEPS2 ($(date -u +%H:%M:%S))"
  $KVZOO train --data "$DATA" --out "$OUT/$name" --resume --steps "$STEPS2" --max-minutes 0 --no-progress \
    >> "$OUT/logs/$name.log" 2>&1
  tail -n 1 "$OUT/logs/$name.log"
}
if [ "$STEPS2" -gt 0 ]; then
  (continue_to ts512-rope; continue_to ts512-alibi) &
  (continue_to ts512-learned; continue_to ts512-rope-draft) &
  (continue_to ts512-rope-gqa; continue_to ts512-rope-mqa) &
  wait
fi

python "$(dirname "$0")/study_models_readme.py" "$OUT"
