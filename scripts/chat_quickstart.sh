#!/usr/bin/env bash
# Set up, then fine-tune SmolLM2-135M-Instruct with MELoRA on packaged multi-turn chit-chat
# conversations, offline, on CPU: `validate` first gives the base model's validation loss and
# replies (the adapters start at zero), then `fit` trains one epoch and validates again; a few
# held-out prompts are shown with the reference and the replies before and after.
# Extra arguments go to both runs, e.g. --trainer.precision bf16-mixed
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh instruct
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=configs/chat/quickstart.yaml
echo "== validation loss and replies of the base model (before training)"
melora-lit validate --config "$config" "$@"
before=$(ls -td lightning_logs/version_* | head -1)
echo "== fit (validation loss and replies after training at the end)"
melora-lit fit --config "$config" "$@"
after=$(ls -td lightning_logs/version_* | head -1)
python - "$before" "$after" <<'PY'
import json, sys
from pathlib import Path

def replies(run):
    files = sorted(Path(run, "generations").glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    return [json.loads(line) for line in files[-1].read_text().splitlines()]

for b, a in list(zip(replies(sys.argv[1]), replies(sys.argv[2])))[:4]:
    print("--", " | ".join(f"{m['role']}: {m['content']}" for m in b["messages"] if m["role"] != "system"))
    print("   reference:", b["reference"])
    print("   before:   ", b["reply"])
    print("   after:    ", a["reply"])
PY
