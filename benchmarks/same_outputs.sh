#!/usr/bin/env bash
# Do two source trees produce the same outputs? For a refactor that must leave
# behaviour bit for bit the same.
#
#   benchmarks/same_outputs.sh OLD_TREE NEW_TREE [WORK_DIR]
#
# Runs, with each tree's code (PYTHONPATH, the current venv's packages), the
# demo in several configurations (plain; joint accounting; bf16 with
# --optimizer-in-backward and checkpointing; NPO with --save-every; GA; LoRA;
# --anchor-offload with JS and eta; finetune; mdu diff; mdu eval) and the
# offline TOFU example (finetune, eval --benchmark tofu, four methods), then
# compares every file: tensors byte for byte, train_log.jsonl and JSON reports
# with times, peak memory and the trees' own paths left out. Prints the files
# that differ; exits 1 if any does. About 2.5 minutes per tree on 2 cores.
set -euo pipefail
OLD=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); WORK=${3:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)

run_tree() {
  local src=$1 w=$2
  rm -rf "$w"; mkdir -p "$w"
  (
    cd "$src"; export PYTHONPATH="$src"
    local m="python -m mdu_cli" d=examples/demo
    local ev="--base $d/model --forget $d/forget.jsonl --retain $d/retain.jsonl --mc-samples 16 --max-new-tokens 8 --steps 8 --block-length 8"
    $m unlearn --config $d/run.yaml --out "$w/plain" --json > "$w/plain.stdout"
    $m eval "$w/plain" $ev --json > "$w/plain.eval.json"
    $m unlearn --config $d/run.yaml --out "$w/joint" --batch-accounting joint --epochs 5 --json > "$w/joint.stdout"
    $m eval "$w/joint" $ev --json > "$w/joint.eval.json"
    $m unlearn --config $d/run.yaml --out "$w/bf16" --dtype bf16 --optimizer-in-backward --gradient-checkpointing \
      --max-grad-norm 0 --epochs 5 --json > "$w/bf16.stdout"
    $m unlearn --config $d/run.yaml --out "$w/npo" --method npo --save-every 7 --epochs 5 --json > "$w/npo.stdout"
    $m unlearn --config $d/run.yaml --out "$w/ga" --method ga --epochs 3 --json > "$w/ga.stdout"
    $m unlearn --config $d/run.yaml --out "$w/lora" --lora --lora-r 4 --epochs 3 --json > "$w/lora.stdout"
    $m unlearn --config $d/run.yaml --out "$w/offload" --anchor-offload --kl js --eta 0.5 --epochs 3 --json \
      > "$w/offload.stdout"
    $m finetune --model $d/model --data $d/retain.jsonl --out "$w/ft" --epochs 2 --lr 1e-3 --json > "$w/ft.stdout"
    $m diff $d/model "$w/plain" --json "$w/plain.diff.json" > "$w/plain.diff.stdout" 2>/dev/null
    python examples/tofu/run.py "$w/tofu" > "$w/tofu.stdout" 2>/dev/null
  ) 2>"$w.log"
}

run_tree "$OLD" "$WORK/old"
run_tree "$NEW" "$WORK/new"
python "$HERE/same_outputs.py" "$WORK/old" "$WORK/new" "$OLD" "$NEW"
