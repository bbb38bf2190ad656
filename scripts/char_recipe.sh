#!/usr/bin/env bash
# The published char-level recipe (4 layers, 4 heads, d_model 64, block 128, batch 32, AdamW
# lr 3e-3 constant, dropout 0.1, exact-erf GELU, tied head, 3000 steps on a 4 KB page), on the
# first 4,096 characters of Moby-Dick's chapter 1 ("Call me Ishmael..."), then a recall check.
#   scripts/char_recipe.sh [OUT=runs/char-recipe] [MAX_MINUTES (default: none)]
set -euo pipefail
OUT=${1:-runs/char-recipe}
ASSETS=${KVZOO_DATA:-/work/shared/data}
KVZOO=${KVZOO:-kvzoo}
mkdir -p "$OUT"
PAGE="$OUT/page.txt"
python - "$ASSETS/corpora/moby-dick-pg2701.txt" "$PAGE" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read().replace("\r\n", "\n")
start = text.index("Call me Ishmael.")
open(sys.argv[2], "w", encoding="utf-8").write(text[start:start + 4096])
PY
limit=()
[ -n "${2:-}" ] && limit=(--max-minutes "$2")
$KVZOO train --data "$PAGE" --tokenizer char --family gpt2 --positional learned --n-layers 4 --n-heads 4 \
  --n-kv-heads 4 --d-model 64 --block-size 128 --batch-size 32 --steps 3000 --lr 3e-3 --min-lr 3e-3 \
  --warmup 0 --weight-decay 0.01 --grad-clip 1.0 --dropout 0.1 --activation gelu --val-fraction 0 \
  --eval-interval 50 --seed 0 --no-progress "${limit[@]}" --out "$OUT/model"
python "$(dirname "$0")/recall.py" "$OUT/model" "$PAGE"
