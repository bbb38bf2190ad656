#!/usr/bin/env bash
# Trains the study models: small character-level Llama-family models on TinyStories that differ
# in one thing at a time. Same size (d_model 128, 4 layers, 4 heads of 32, SwiGLU, tied,
# context 256), same data, seed, batch and schedule:
#   positional scheme (MHA):   learned | rope | alibi
#   head layout (rope):        MHA (4 kv heads) | GQA (2) | MQA (1)
# plus a smaller draft model with the same tokenizer for speculative decoding.
# Each run stops after MAX_MINUTES (the cosine schedule follows time when it does).
#
#   scripts/train_study_models.sh [OUT_DIR=/work/models] [MAX_MINUTES=9]
set -euo pipefail
OUT=${1:-/work/models}
MINUTES=${2:-9}
DATA=${KVZOO_DATA:-/work/shared/data}/corpora/tinystories-valid-part1.txt
KVZOO=${KVZOO:-kvzoo}
mkdir -p "$OUT/logs"

common=(--data "$DATA" --tokenizer char --family llama --n-layers 4 --n-heads 4 --d-model 128
        --block-size 256 --batch-size 16 --steps 3000 --lr 3e-3 --min-lr 3e-4 --warmup 100
        --weight-decay 0.1 --grad-clip 1.0 --dropout 0 --eval-interval 100 --eval-batches 8
        --val-fraction 0.1 --seed 0 --max-minutes "$MINUTES" --no-progress)

train() {  # name, then the flags that make it differ
  local name=$1; shift
  if [ -f "$OUT/$name/trainer_state.json" ]; then echo "$name: already trained"; return; fi
  echo "$name: training ($(date -u +%H:%M:%S))"
  $KVZOO train "${common[@]}" "$@" --out "$OUT/$name" > "$OUT/logs/$name.log" 2>&1
  tail -n 1 "$OUT/logs/$name.log"
}

train tinystories-char-rope     --positional rope    --n-kv-heads 4
train tinystories-char-alibi    --positional alibi   --n-kv-heads 4
train tinystories-char-learned  --positional learned --n-kv-heads 4
train tinystories-char-rope-gqa --positional rope    --n-kv-heads 2
train tinystories-char-rope-mqa --positional rope    --n-kv-heads 1
# the draft for speculative decoding (target: tinystories-char-rope; same alphabet)
train tinystories-char-rope-draft --positional rope --n-kv-heads 2 --n-layers 2 --d-model 64 --n-heads 2

python "$(dirname "$0")/study_models_readme.py" "$OUT"
