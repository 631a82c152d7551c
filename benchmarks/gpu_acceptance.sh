#!/usr/bin/env bash
# The CLI end to end on an accelerator: every command a user types, on tiny
# LLaDA- and Dream-like models built on the spot, then gpu_check.py's rows.
#
#   bash benchmarks/gpu_acceptance.sh                       # CUDA; writes gpu_acceptance.json
#   bash benchmarks/gpu_acceptance.sh --device cpu --out /tmp/acceptance.json
#   bash benchmarks/gpu_acceptance.sh --with-8b             # also LLaDA-8B's shape (80 GB GPU)
#
# Nothing is downloaded: the Hub is switched off for every command. Exit code 1
# when any check failed; benchmarks/gpu_acceptance.py says what each checks.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
# A private Hugging Face home: the user's cache and token are neither read nor written.
HF_HOME="$(mktemp -d -t mdu-acceptance-hf-XXXXXX)"
export HF_HOME HF_TOKEN_PATH="$HF_HOME/token"
unset HF_TOKEN
trap 'rm -rf "$HF_HOME"' EXIT
python benchmarks/gpu_acceptance.py "$@"
