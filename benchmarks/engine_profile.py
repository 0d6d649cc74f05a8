#!/usr/bin/env python
"""Where an adapter engine's step time goes: torch's profiler over one in-process vLLM engine.

One LoRA-enabled CPU engine (SmolLM2 fp32, compiled, ``--lora-target-modules q_proj v_proj`` as
``moka-bench compare`` starts it, torch on one thread as vLLM's CPU worker on a 2-core machine)
runs the same 8 prompts of 64 random tokens, 16 greedy tokens each, as base requests and with 8
distinct adapters from ``moka-bench compare``'s cache (``--kind``; run ``compare`` once first),
alternately. The profiler's self time per op for one batch of each, side by side, shows what the
adapters add; the model runner's forward times of ``--repeats`` more batches of each give the
decode steps' medians. Usage::

    python benchmarks/engine_profile.py --kind moka-r8 --out benchmarks/results/engine-profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process: one profile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--kind", default="moka-r8", help="adapter family of compare's cache")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch
    import vllm.v1.worker.gpu_model_runner as runner
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from moka_core.base_models import cache_dir, materialize_default_base

    steps: list[float] = []
    forward = runner.GPUModelRunner._model_forward

    def timed_forward(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return forward(self, *a, **k)
        finally:
            steps.append(time.perf_counter() - t0)

    runner.GPUModelRunner._model_forward = timed_forward
    base = materialize_default_base()
    root = cache_dir() / "bench-adapters" / base.name
    names = [f"{args.kind}-{i}" for i in range(8)]
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise SystemExit(f"{missing} not in {root}: run moka-bench compare --methods {args.kind}")
    llm = LLM(model=str(base), dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
              enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=16,
              lora_target_modules=["q_proj", "v_proj"])  # fmt: skip
    requests = [LoRARequest(n, i + 1, str(root / n)) for i, n in enumerate(names)]
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 1000) for _ in range(64)]}
               for _ in range(8)]  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    def batch(kind: str) -> list[float]:
        steps.clear()
        llm.generate(prompts, params, lora_request=requests if kind != "base" else None,
                     use_tqdm=False)  # fmt: skip
        return list(steps)

    kinds = ("base", args.kind)
    for kind in kinds:  # warm: adapters loaded and in slots
        batch(kind)
    self_us: dict[str, collections.Counter] = {}
    counts: dict[str, collections.Counter] = {}
    for kind in kinds:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            batch(kind)
        self_us[kind] = collections.Counter()
        counts[kind] = collections.Counter()
        for e in prof.key_averages():
            self_us[kind][e.key] = e.self_cpu_time_total
            counts[kind][e.key] = e.count
    decode_ms: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            decode_ms[kind].append(statistics.median(batch(kind)[1:]) * 1e3)  # [0]: prefill
    b, a = kinds
    keys = sorted(
        set(self_us[b]) | set(self_us[a]), key=lambda k: -abs(self_us[a][k] - self_us[b][k])
    )
    lines = [
        f"| op | calls (base / {a}) | self ms, base | self ms, {a} | difference |",
        "|---|---|---|---|---|",
    ]
    for k in keys[: args.top]:
        lines.append(
            f"| `{k}` | {counts[b][k]} / {counts[a][k]} | {self_us[b][k] / 1e3:.1f} | "
            f"{self_us[a][k] / 1e3:.1f} | {(self_us[a][k] - self_us[b][k]) / 1e3:+.1f} |"
        )
    total = {k: sum(v.values()) / 1e3 for k, v in self_us.items()}
    lines.append(f"| all ops | | {total[b]:.1f} | {total[a]:.1f} | {total[a] - total[b]:+.1f} |")
    med = {k: statistics.median(v) for k, v in decode_ms.items()}
    ratios = [x / y for x, y in zip(decode_ms[a], decode_ms[b], strict=True)]
    summary = (
        f"decode step median: base {med[b]:.2f} ms, {a} {med[a]:.2f} ms; median of the "
        f"{args.repeats} paired ratios {statistics.median(ratios):.3f}"
    )
    table = "\n".join(lines)
    print(table)
    print(summary)
    if args.out:
        report = {
            "kind": "engine_profile",
            "command": " ".join(["python", *sys.argv]),
            "adapters": a,
            "torch_threads": torch.get_num_threads(),
            "profile_self_us": {k: dict(v) for k, v in self_us.items()},
            "profile_counts": {k: dict(v) for k, v in counts.items()},
            "decode_step_ms": decode_ms,
            "summary": summary,
        }
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
        args.out.with_suffix(".md").write_text(f"{table}\n\n{summary}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
