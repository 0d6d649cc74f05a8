"""Cold load of an adapter folder in one in-process vLLM engine (CPU build), and where it goes.

The in-process twin of ``moka-bench compare``'s cold-load figure (no HTTP): the example adapter
is copied into ``--copies`` fresh folders; for each, a one-token request is timed the first time
(the adapter is read, checked, folded and written to a slot) and again right after (warm), and
the difference is reported, MoKA and a LoRA-8 of the same targets interleaved copy by copy.

    .venv/bin/python benchmarks/cold_load.py [FOLDER] [--copies 6] [--profile [--profile-out FILE]]

``--profile`` also prints the functions that take the most time over the MoKA cold loads
(``cProfile``, cumulative): the engine core runs in this process for it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

DIMS = {"q_proj": (576, 576), "v_proj": (192, 576)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="examples/adapters/commonsense-moka")
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-out", help="also write the cProfile stats to this file")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the loads happen in this process

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from moka_core.base_models import materialize_default_base
    from moka_serve.bench.random_adapters import write_random_lora

    base = materialize_default_base()
    root = Path(tempfile.mkdtemp(prefix="moka-cold-load-"))
    llm = LLM(model=str(base), dtype="float32", max_model_len=256, max_num_seqs=4,
              enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2)  # fmt: skip
    sp = SamplingParams(max_tokens=1, temperature=0)
    prompt = ["Is the sky blue?"]
    llm.generate(prompt, sp, use_tqdm=False)
    profiler = cProfile.Profile() if args.profile else None
    loads: dict[str, list[float]] = {"moka": [], "lora8": []}
    next_id = 1
    for i in range(args.copies + 1):  # the first copy warms the code paths and is not counted
        for kind in loads:
            path = root / f"{kind}-{i}"
            if kind == "moka":
                shutil.copytree(args.folder, path)
            else:
                write_random_lora(path, list(DIMS), seed=i, r=8, dims=DIMS, layers=30, std=0.02)
            req = LoRARequest(path.name, next_id, str(path))
            next_id += 1
            times = []
            for attempt in range(2):  # cold, then warm
                prof = profiler if (kind == "moka" and attempt == 0 and i > 0) else None
                t = time.perf_counter()
                if prof is not None:
                    prof.enable()
                llm.generate(prompt, sp, lora_request=req, use_tqdm=False)
                if prof is not None:
                    prof.disable()
                times.append(time.perf_counter() - t)
            if i > 0:
                loads[kind].append((times[0] - times[1]) * 1e3)
    shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"command: {' '.join(sys.argv)}")
    print("| adapter | cold load ms over warm (median) | all copies |")
    print("|---|---|---|")
    for kind, v in loads.items():
        name = args.folder if kind == "moka" else "LoRA-8 (q_proj, v_proj)"
        print(f"| {name} | {statistics.median(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    if profiler is not None:
        print(f"\n## cProfile over {args.copies} MoKA cold loads (cumulative)")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        if args.profile_out:
            profiler.dump_stats(args.profile_out)


if __name__ == "__main__":
    main()
