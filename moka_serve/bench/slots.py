"""``moka-bench slots``: adapter latency against the memory given to adapter slots (issue #12).

A batch holds at most ``--max-loras`` distinct adapters, so under a many-adapter load requests
queue for slots, and on a GPU memory is what limits the slot count. This command serves
``--num-adapters`` seeded random adapters of one method per phase (MoKA-only engines with
``--moka-only``; LoRA engines with ``--max-lora-rank`` at the adapters' rank) at each slot count
of ``--phases``, warms every adapter into vLLM's CPU cache (``--max-cpu-loras`` holds them all,
so disk plays no part), then keeps ``--concurrency`` requests in flight, adapters drawn by S-LoRA's
power law (``--powerlaw-alpha``: 1 uniform, smaller skewed) and ``--base-fraction`` of requests to
the base. The ``today`` method is the engine as it was before the slot pool: MoKA adapters with
rank-16 LoRA buffers and MoKA banks padded to the bank limits in every slot.

Rows (JSON ``rows``): ``method``, ``n``, ``popularity``, ``max_loras``, ``slot_bytes`` (per slot,
``moka_core.slots``: LoRA buffers + MoKA storage), ``slot_memory_bytes``, ``ttft_p50_s``,
``ttft_p99_s`` (adapter requests), ``base_ttft_p50_s``, ``base_ttft_p99_s``, ``requests_per_s``,
``rss_mb`` (the server's processes after the run). Results: ``<out>.json``, ``.md`` and ``.png``
(adapter TTFT p50 against slot memory, per method).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shlex
import sys
import time
from pathlib import Path

from .client import run_workload
from .report import machine, stats
from .server import children_rss_bytes, free_port, running_server
from .workload import WorkloadConfig, build_workload

METHODS = ("moka", "lora8", "lora16", "today")


def add_slots_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slots")
    g.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M)")
    g.add_argument("--dtype", default="float32")
    g.add_argument(
        "--phases",
        default="today:4,moka:4,moka:32,lora8:16,lora16:8",
        help="METHOD:SLOTS,... (methods: moka, lora8, lora16, today)",
    )
    g.add_argument("--num-adapters", type=int, default=200)
    g.add_argument("--targets", default="q_proj,v_proj")
    g.add_argument("--moka-components", type=int, default=4)
    g.add_argument("--concurrency", type=int, default=32)
    g.add_argument("--num-requests", type=int, default=256, help="timed requests per phase")
    g.add_argument("--input-len", default="64")
    g.add_argument("--output-len", default="32")
    g.add_argument("--powerlaw-alpha", type=float, default=1.0)
    g.add_argument("--base-fraction", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-model-len", type=int, default=512)
    g.add_argument("--out", type=Path, default=Path("benchmarks/results/slots"))
    g.add_argument("--start-timeout", type=float, default=900.0)
    g.add_argument("--timeout", type=float, default=900.0, help="seconds per request")


def parse_phases(text: str) -> list[tuple[str, int]]:
    phases = []
    for part in text.split(","):
        method, _, slots = part.strip().partition(":")
        if method not in METHODS or not slots.isdigit() or int(slots) < 1:
            raise ValueError(f"bad phase {part!r}: use METHOD:SLOTS with METHOD in {METHODS}")
        phases.append((method, int(slots)))
    return phases


def phase_slot_bytes(method: str, spec: dict, dtype: str) -> int:
    """What one slot costs on this rank for ``method``'s engine (``moka_core.slots``)."""
    from moka_core.limits import bank_limits
    from moka_core.slots import DTYPE_BYTES, KINDS, lora_slot_bytes, table_slot_bytes

    elt = DTYPE_BYTES.get(dtype, 4)
    dims, layers, vocab = spec["dims"], spec["layers"], spec["vocab"]
    if method == "moka":
        return spec["moka_bytes"] + table_slot_bytes(layers)  # MoKA-only: no LoRA buffers
    if method == "today":  # rank-16 buffers and banks padded to the limits, per slice
        comps, cap = bank_limits()
        padded = sum(comps * len(parts) * 2 * cap for parts in KINDS.values())
        return lora_slot_bytes(dims, layers, vocab, 16, elt) + layers * padded * elt
    return lora_slot_bytes(dims, layers, vocab, int(method.removeprefix("lora")), elt)


def run_phase(args, base: Path, adapters: Path, names: list[str], method: str, slots: int,
              log: Path) -> dict:  # fmt: skip
    from moka_serve.cli import build_command, build_parser

    from .serve import BenchError, run_requests

    port = free_port()
    serve = ["--base", str(base), "--quantize", "none"]
    if method == "moka":
        serve.append("--moka-only")
    rest = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.concurrency), "--max-loras", str(slots),
            "--max-cpu-loras", str(max(len(names), slots)), "--seed", "0",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if method.startswith("lora"):
        rest += ["--max-lora-rank", method.removeprefix("lora")]
    if method == "today":
        rest += ["--max-lora-rank", "16"]
    cmd, env = build_command(build_parser().parse_args(serve), rest)
    env["MOKA_ADAPTER_DIR"] = str(adapters)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    with running_server(cmd, env, log, port, args.start_timeout) as url:
        warm = WorkloadConfig(num_requests=len(names), popularity="distinct",
                              batch=args.concurrency, input_len="8", output_len="2",
                              seed=args.seed)  # fmt: skip
        results, _ = run_requests(url, names, warm, concurrency=args.concurrency,
                                  progress=False, timeout_s=args.timeout)  # fmt: skip
        if not all(r.ok for r in results):
            bad = next(r.error for r in results if not r.ok)
            raise BenchError(f"{method}: warm-up request failed: {bad}")
        cfg = WorkloadConfig(num_requests=args.num_requests, popularity="powerlaw",
                             powerlaw_alpha=args.powerlaw_alpha, batch=args.concurrency,
                             input_len=args.input_len, output_len=args.output_len,
                             seed=args.seed)  # fmt: skip
        specs = build_workload(cfg, names)
        rng = random.Random(args.seed)
        specs = [s if rng.random() >= args.base_fraction else dataclasses.replace(s, model=str(base))
                 for s in specs]  # fmt: skip
        results, wall = asyncio.run(run_workload(url, specs, concurrency=args.concurrency,
                                                 timeout_s=args.timeout, progress=False))  # fmt: skip
        rss = children_rss_bytes() / 2**20
    failed = [r for r in results if not r.ok]
    if failed:
        raise BenchError(f"{method} x {slots}: {len(failed)} request(s) failed: {failed[0].error}")
    ad = stats([r.ttft_s for r in results if r.model != str(base)])
    bs = stats([r.ttft_s for r in results if r.model == str(base)])
    return {
        "ttft_p50_s": ad["p50"],
        "ttft_p99_s": ad["p99"],
        "base_ttft_p50_s": bs["p50"],
        "base_ttft_p99_s": bs["p99"],
        "requests_per_s": len(results) / wall,
        "wall_s": wall,
        "rss_mb": rss,
    }


def cmd_slots(args: argparse.Namespace) -> int:
    from moka_core.base_models import cache_dir, llama_dims, materialize_default_base
    from moka_core.slots import adapter_numel_by_kind, vocab_size

    from .compare import moka_shapes, write_adapters

    phases = parse_phases(args.phases)
    base = Path(args.base) if args.base else materialize_default_base()
    dims, layers = llama_dims(base)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    shapes = {"moka-kron": moka_shapes(dims, layers, targets, "moka-kron", args.moka_components)}
    spec = {"dims": dims, "layers": layers, "targets": targets, "shapes": shapes,
            "vocab": vocab_size(base)}  # fmt: skip
    root = cache_dir() / "slots-adapters" / base.name
    dirs: dict[str, tuple[Path, list[str]]] = {}
    for method in {m for m, _ in phases}:
        kind = "moka" if method in ("moka", "today") else method
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        adapter_method = "moka-kron" if kind == "moka" else kind  # compare's method names
        names = {f"{kind}-{i:03d}": adapter_method for i in range(args.num_adapters)}
        write_adapters(folder, base, names, spec)
        dirs[method] = (folder, sorted(names))
    some_moka = root / "moka" / "moka-000"
    per_layer = sum(adapter_numel_by_kind(some_moka).values()) if some_moka.exists() else 0
    spec["moka_bytes"] = layers * per_layer * 4  # the CPU path packs float32
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (method, slots) in enumerate(phases):
        folder, names = dirs[method]
        print(f"# phase {k + 1}/{len(phases)}: {method} with {slots} slots", flush=True)
        log = args.out.parent / f"{args.out.name}.{method}-{slots}.server.log"
        result = run_phase(args, base, folder, names, method, slots, log)
        slot_bytes = phase_slot_bytes(method, spec, args.dtype)
        row = {"method": method, "n": args.num_adapters,
               "popularity": f"powerlaw-{args.powerlaw_alpha:g}", "max_loras": slots,
               "slot_bytes": slot_bytes, "slot_memory_bytes": slots * slot_bytes, **result}  # fmt: skip
        rows.append(row)
        print(f"#   adapter TTFT p50 {row['ttft_p50_s']:.2f} s, base {row['base_ttft_p50_s']:.2f} "
              f"s, {row['requests_per_s']:.2f} req/s, slots {slots * slot_bytes / 2**20:.0f} MiB",
              flush=True)  # fmt: skip
    report = {"kind": "moka-bench slots", "command": shlex.join(["moka-bench", *sys.argv[1:]]),
              "machine": machine(), "base": str(base), "dtype": args.dtype,
              "concurrency": args.concurrency, "num_requests": args.num_requests,
              "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    md = slots_markdown(report)
    args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    plot_slots(rows, args.out.with_suffix(".png"))
    print(md)
    return 0


def slots_markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`  ",
        f"{report['machine']['processor']}, {report['machine']['cpus']} cpus; base "
        f"{Path(report['base']).name}, {report['dtype']}; {report['concurrency']} in flight, "
        f"{report['num_requests']} timed requests per phase",
        "",
        "| method | adapters | popularity | slots | MiB per slot | slot memory MiB | adapter TTFT "
        "p50 / p99 s | base TTFT p50 / p99 s | requests/s | server RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['n']} | {r['popularity']} | {r['max_loras']} | "
            f"{r['slot_bytes'] / 2**20:.2f} | {r['slot_memory_bytes'] / 2**20:.0f} | "
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
            f"{r['base_ttft_p50_s']:.2f} / {r['base_ttft_p99_s']:.2f} | "
            f"{r['requests_per_s']:.2f} | {r['rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_slots(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["slot_memory_bytes"] / 2**20, r["ttft_p50_s"], r["max_loras"])
                     for r in rows if r["method"] == method)  # fmt: skip
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for x, y, k in pts:
            ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("memory of the adapter slots (MiB, log; labels: slots)")
    ax.set_ylabel("adapter TTFT p50 (s)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
