#!/usr/bin/env python
"""The CPU kernel as a model step calls it: cache-cold, after each layer's weights streamed by.

``benchmarks/kernels.py`` times one bank over and over, so its factors and the Python of the call
stay in the caches. In a serving step each adapted layer's call comes right after that layer's
weights went through the caches (18 MB per SmolLM2 layer in float32), and 30 layers' banks take
turns. This script builds 30 layers' q_proj and v_proj banks of 8 distinct adapters of
``moka-train``'s ``mixed`` family (one per slot), reads a buffer of the layer's weight size
before each layer's calls (``--cold``; without it nothing runs between calls) and times, per
layer (q and v, two calls), interleaved over ``--repeats``:

* ``run``: ``moka_kernels.cpu_kernel.run``, what the layers called until this change;
* ``LayerCall``: the per-layer call the plugin's layers make now (arguments read once);
* ``empty``: ``LayerCall`` with every token at slot -1: the call's Python and ``ctypes`` alone.

It also reports the stream's bandwidth and the factors' bytes per layer, so the kernel's
time can be read against the memory floor (bytes / bandwidth). Usage::

    python benchmarks/cold_kernel.py --out benchmarks/results/cold-kernel-cpu-epyc.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as K  # noqa: E402  (the layer shapes and bank builder of the kernel benchmark)

from moka_core.base_models import cache_dir  # noqa: E402
from moka_kernels import cpu_kernel  # noqa: E402

LAYERS = 30  # SmolLM2-135M's decoder layers
WEIGHT_BYTES = 18 * 2**20  # one SmolLM2 decoder layer's float32 weights


def measure(rank: int, tokens: int, mapping: str, cold: bool, repeats: int) -> dict:
    by_name = {layer.name: layer for layer in K.LAYERS}
    banks = [
        [
            K.build_layer(
                by_name[f"smollm2-135m.{t}.mixed-r{rank}"], 8, torch.float32, "cpu", seed=2 * i + j
            ).cpu_bank  # fmt: skip
            for j, t in enumerate(("q_proj", "v_proj"))
        ]
        for i in range(LAYERS)
    ]
    weights = torch.randn(LAYERS, WEIGHT_BYTES // 4)
    buf = torch.full((max(tokens, 64),), -1, dtype=torch.long)
    buf[:tokens] = (
        torch.arange(tokens) % 8 if mapping == "distinct" else torch.arange(tokens) * 8 // tokens
    )
    empty_buf = torch.full_like(buf, -1)
    x = torch.randn(tokens, 576)
    ys = [torch.zeros(tokens, 576), torch.zeros(tokens, 192)]
    calls = [[cpu_kernel.LayerCall(b, buf) for b in pair] for pair in banks]
    empty = [[cpu_kernel.LayerCall(b, empty_buf) for b in pair] for pair in banks]
    slots = buf[:tokens]
    variants = {
        "run": lambda i, j: cpu_kernel.run(x, ys[j], slots, banks[i][j]),
        "LayerCall": lambda i, j: calls[i][j](x, ys[j]),
        "empty": lambda i, j: empty[i][j](x, ys[j]),
    }
    us: dict[str, list[float]] = {k: [] for k in variants}
    stream_s = []
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in variants.items():
                total = 0.0
                for i in range(LAYERS):
                    if cold:
                        t0 = time.perf_counter()
                        weights[i].sum()
                        stream_s.append(time.perf_counter() - t0)
                    for j in range(2):
                        t0 = time.perf_counter()
                        fn(i, j)
                        total += time.perf_counter() - t0
                us[name].append(total / LAYERS * 1e6)
    factor_bytes = sum(b.cpu.packed_numel[s] * 4 for b in banks[0] for s in set(slots.tolist()))
    row = {
        "rank": rank,
        "tokens": tokens,
        "mapping": mapping,
        "cold": cold,
        "us_per_layer_median": {k: statistics.median(v) for k, v in us.items()},
        "us_per_layer": us,
        "factor_bytes_per_layer": factor_bytes,
    }
    if stream_s:
        gbps = WEIGHT_BYTES / statistics.median(stream_s) / 1e9
        row["stream_gb_s"] = gbps
        row["memory_floor_us"] = factor_bytes / gbps / 1e3
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)  # as vLLM's CPU worker on a 2-core machine
    why = cpu_kernel.load(cache_dir() / "kernels")
    if why:
        raise SystemExit(why)
    rows = [
        measure(rank, tokens, mapping, cold, args.repeats)
        for rank in (2, 8)
        for tokens, mapping in ((8, "distinct"), (64, "chunks"))
        for cold in (False, True)
    ]
    lines = [
        "| adapter | tokens | caches | run | LayerCall | empty call | factor KB | floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["us_per_layer_median"]
        floor = f"{r['memory_floor_us']:.1f}" if "memory_floor_us" in r else "-"
        lines.append(
            f"| mixed rank-{r['rank']} size | {r['tokens']} ({r['mapping']}) | "
            f"{'cold' if r['cold'] else 'warm'} | {m['run']:.1f} | {m['LayerCall']:.1f} | "
            f"{m['empty']:.1f} | {r['factor_bytes_per_layer'] / 1024:.0f} | {floor} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        report = {
            "kind": "cold_kernel",
            "command": " ".join(["python", *sys.argv]),
            "machine": {"processor": platform.processor(), "torch": torch.__version__},
            "unit": "microseconds per layer (q_proj and v_proj calls), median over repeats",
            "rows": rows,
        }
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
        args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
