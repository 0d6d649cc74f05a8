#!/usr/bin/env bash
# The GPU checks of issue #13, prepared to run in one device call (no vLLM there: kernel level).
#   device run:  bash benchmarks/gpu_check.sh      (timeout_s ~540; results under $OUT)
# 1. tests/test_kernels.py on CUDA: every kernel vs the float64 kron reference in fp32/fp16/bf16,
#    the shipped DECODE_BLOCKS/PREFILL_BLOCKS in half precision (never run on the interpreter),
#    the kernel's CUDA-graph test and the layer-stack graph test with per-step metadata
#    (MokaKernelMeta rewritten in place between replays, slots rewritten with other shapes);
#    tests/test_sharding.py on CUDA: tensor-parallel shards (input/output offsets) in Triton.
#    Both include the low-rank (grouped rank-1) path of issue #21: ranks 1, 3, 7 and 17 in the
#    Triton kernel's GEMV-shaped branch, decode and prefill forms, fp32/fp16/bf16.
# 2. benchmarks/kernels.py --device cuda: floor, base GEMM, LoRA baselines (Punica-style BGMV in
#    torch; vLLM's lora_shrink/expand when vLLM is importable, which it is not on the device
#    host), MoKA decode/prefill forms, in CUDA graphs: the kron-family layers against LoRA-16,
#    and moka-train's mixed adapters at rank-2 and rank-8 sizes against LoRA-2 and LoRA-8 (the
#    same parameter count), Llama-3-8B and SmolLM2 q/v shapes; tables to docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_sharding.py 2>&1 | tee "$OUT/test_kernels.log" | tail -15
timeout 240 python3 benchmarks/kernels.py --device cuda --dtype bf16 --cuda-graph --keep-going \
  --out "$OUT/kernels-cuda-bf16.json" 2>&1 | tee "$OUT/kernels.log" | tail -60
