#!/usr/bin/env bash
# Set up, then run the test suite offline on CPU. Extra arguments go to pytest.
#   bash scripts/test.sh                    everything (what CI runs), on every core
#   bash scripts/test.sh -m "not slow"      the inner loop: no real processes, soak or smoke runs
# pytest-xdist runs the tests on MELORA_LIT_TEST_WORKERS processes (default: the number of cores,
# at most 4); a module's tests stay on one worker, so its module-scoped runs are made once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset PYTHONDONTWRITEBYTECODE  # bytecode is written on first import (setup.sh installs without it)
workers="${MELORA_LIT_TEST_WORKERS:-$(python -c 'import os; print(min(4, os.cpu_count() or 1))')}"
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadscope)
exec python -m pytest "${parallel[@]}" "$@"
