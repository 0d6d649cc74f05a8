#!/usr/bin/env bash
# The GPU checks of issue #13, prepared to run in one device call (no vLLM there: kernel level).
#   device run:  bash benchmarks/gpu_check.sh      (timeout_s ~540; results under $OUT)
# 1. tests/test_kernels.py on CUDA: every kernel vs the float64 kron reference in fp32/fp16/bf16,
#    the shipped DECODE_BLOCKS/PREFILL_BLOCKS in half precision (never run on the interpreter),
#    the kernel's CUDA-graph test and the layer-stack graph test with per-step metadata
#    (MokaKernelMeta rewritten in place between replays, slots rewritten with other shapes);
#    tests/test_sharding.py on CUDA: tensor-parallel shards (input/output offsets) in Triton.
# 2. benchmarks/kernels.py --device cuda: floor, base GEMM, rank-16 LoRA gather baseline, MoKA
#    decode/prefill forms, in CUDA graphs; the table goes to benchmarks/README.md by hand.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_sharding.py 2>&1 | tee "$OUT/test_kernels.log" | tail -15
timeout 200 python3 benchmarks/kernels.py --device cuda --dtype bf16 --cuda-graph \
  --out "$OUT/kernels-cuda-bf16.json" 2>&1 | tee "$OUT/kernels.log" | tail -40
