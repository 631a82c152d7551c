#!/usr/bin/env bash
# RWKU as the MDU paper runs it: Dream-7B-Instruct, RWKU's first ten targets,
# forget-only (--alpha 0), a tau sweep, each target unlearned from the
# original model; then one table, the mean over targets per tau.
#
#   bash examples/rwku/paper_targets.sh [WORK_DIR]      # on a GPU, with Hub access (or a warm cache)
#
# Per target: the original writes its forget corpus (mdu corpus), then for
# each tau an unlearned copy is made and evaluated beside the original
# (mdu eval --benchmark rwku --preset paper --base ORIGINAL). A finished step
# is skipped when rerun. Pass MDU_RWKU_PRESET= (empty) for RWKU's own
# definitions instead of the paper's.
set -euo pipefail
MODEL=${MDU_RWKU_MODEL:-Dream-org/Dream-v0-Instruct-7B}
WORK=${1:-rwku-dream}
TAUS=(${MDU_RWKU_TAUS:-0 0.25 0.5 0.75 1})
PRESET=${MDU_RWKU_PRESET---preset paper}
TARGETS=("Stephen King" "Confucius" "Bruce Lee" "Warren Buffett" "Christina Aguilera" "Cindy Crawford"
         "Marie Osmond" "Paris Hilton" "Justin Bieber" "Prince Harry, Duke of Sussex")
mkdir -p "$WORK"
for target in "${TARGETS[@]}"; do
  slug=$(echo "$target" | tr -c 'A-Za-z0-9\n' '_')
  corpus="$WORK/$slug/corpus.jsonl"
  if [ ! -f "$corpus" ]; then
    mdu corpus --model "$MODEL" --target "$target" --out "$corpus" --samples 32 --seed 0
  fi
  for tau in "${TAUS[@]}"; do
    out="$WORK/$slug/mdu-tau$tau"
    if [ ! -f "$out/mdu_run.json" ]; then
      mdu unlearn --model "$MODEL" --forget "$corpus" --method mdu --tau "$tau" --alpha 0 --out "$out" --overwrite
    fi
    if [ ! -f "$out/rwku.json" ]; then
      # shellcheck disable=SC2086
      mdu eval "$out" --benchmark rwku --target "$target" $PRESET --base "$MODEL" --json > "$out/rwku.json.tmp"
      mv "$out/rwku.json.tmp" "$out/rwku.json"
    fi
  done
done
python "$(dirname "$0")/aggregate.py" "$WORK"/*/mdu-tau*/rwku.json | tee "$WORK/table.md"
