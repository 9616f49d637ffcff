#!/usr/bin/env bash
# Set up, then instruction-tune SmolLM2-135M-Instruct with MELoRA on packaged chit-chat
# conversations, offline, on CPU: a `validate` run first gives the base model's validation loss
# (the adapters start at zero), then `fit` trains one epoch and validates again.
# Extra arguments go to both runs, e.g. --trainer.precision bf16-mixed
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh instruct
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=configs/instruct/quickstart.yaml
echo "== validation loss of the base model (before training)"
melora-lit validate --config "$config" "$@"
echo "== fit (validation loss after training at the end)"
exec melora-lit fit --config "$config" "$@"
