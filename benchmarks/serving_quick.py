"""Per-token cost of MoKA vs LoRA adapters in one vLLM engine (CPU build), SmolLM2-135M fp32.

The offline-engine twin of ``moka-bench compare`` (no HTTP, no client: the per-step cost
alone, handy under a profiler): one LoRA-enabled engine serves 8 prompts at once, 64 greedy
tokens each (``ignore_eos``), for three configurations interleaved in every repeat so machine
drift cancels: base requests, 8 distinct random MoKA adapters (q_proj and v_proj; ``--moka``
names them as ``moka-bench compare`` does: ``moka-r8``, moka-train's default adapter at a rank-8
LoRA's size, by default) and 8 distinct random LoRAs of ``--lora-rank`` on the same targets.
Reports the median ms per decode step and each ratio to the base requests.

    .venv/bin/python benchmarks/serving_quick.py [--reps 3] [--tokens 64] [--plain] [--eager]
        [--moka moka-r8|moka-r2|moka-kron] [--lora-rank 8] [--profile N]

``--plain`` starts the engine without LoRA (the baseline users compare with), ``--eager`` with
``enforce_eager``; the adapter engine compiles by default (the plugin keeps compilation on).
``--profile N`` runs the engine in this process and prints the ops that take the most CPU
time over N decode steps of each configuration (``torch.profiler``), after the timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

DIMS = {"q_proj": (576, 576), "v_proj": (192, 576)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--adapters-dir", default="/tmp/moka-serving-quick")
    ap.add_argument("--plain", action="store_true", help="engine without LoRA: base requests only")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--moka", default="moka-r8", help="a moka-bench compare method")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--profile", type=int, default=0, help="profile N decode steps per config")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.profile:  # the engine core in this process, so the profiler sees its ops
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from moka_core.base_models import materialize_default_base
    from moka_serve.bench.compare import moka_shapes
    from moka_serve.bench.random_adapters import random_moka, write_moka, write_random_lora

    base = materialize_default_base()
    components = moka_shapes(DIMS, 30, list(DIMS), args.moka, components=4)
    gating = max(len(c) for c in components.values()) > 1
    root = Path(args.adapters_dir) / f"{args.moka}-lora{args.lora_rank}"
    root.mkdir(parents=True, exist_ok=True)
    mokas, loras = [], []
    for i in range(8):
        p, q = root / f"moka{i}", root / f"lora{i}"
        if not p.exists():
            write_moka(p, random_moka(components, seed=i, dims=DIMS, layers=30, std=0.05,
                                      gating=gating))  # fmt: skip
        if not q.exists():
            write_random_lora(q, list(DIMS), seed=i, r=args.lora_rank, dims=DIMS, layers=30,
                              std=0.02)  # fmt: skip
        mokas.append(LoRARequest(f"moka{i}", i + 1, str(p)))
        loras.append(LoRARequest(f"lora{i}", 100 + i, str(q)))

    lora = (
        {}
        if args.plain
        else dict(enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=16)
    )
    t0 = time.perf_counter()
    llm = LLM(model=str(base), dtype="float32", enforce_eager=args.eager, max_model_len=512,
              max_num_seqs=8, **lora)  # fmt: skip
    print(f"engine start: {time.perf_counter() - t0:.0f} s")
    prompts = [f"Write a story about the number {i}." for i in range(8)]
    configs = (
        {"base": None}
        if args.plain
        else {"base": None, f"{args.moka} x8": mokas, f"lora{args.lora_rank} x8": loras}
    )
    warm = SamplingParams(max_tokens=2, temperature=0)
    for reqs in configs.values():  # load every adapter into its slot before timing
        llm.generate(prompts, warm, lora_request=reqs, use_tqdm=False)
    sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.reps):
        for name, reqs in configs.items():
            t = time.perf_counter()
            llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
            times[name].append((time.perf_counter() - t) / args.tokens * 1000)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"command: {' '.join(sys.argv)}")
    print("| requests | ms/step (median) | ratio to base | all repeats |")
    print("|---|---|---|---|")
    for k, v in med.items():
        reps = ", ".join(f"{x:.1f}" for x in times[k])
        print(f"| {k} | {v:.1f} | {v / med['base']:.2f} | {reps} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        sp = SamplingParams(max_tokens=args.profile, temperature=0, ignore_eos=True)
        for name, reqs in configs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
            print(f"\n## {name}: top ops by self CPU time over {args.profile} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
