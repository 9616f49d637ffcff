#!/usr/bin/env bash
# Set up, then fine-tune MiniLM with MELoRA on BBC News, offline, on CPU (a few minutes).
# Extra arguments go to `melora-lit fit`, e.g. --trainer.max_epochs 1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh quickstart
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset PYTHONDONTWRITEBYTECODE  # bytecode is written on first import (setup.sh installs without it)
exec melora-lit fit "$@"
