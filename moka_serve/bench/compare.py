"""``moka-bench compare``: plain engine vs base vs N MoKA vs N LoRA adapters, interleaved.

One vLLM server (``moka-serve``, the same engine build and base for every configuration) is
started with LoRA enabled, and a second one without (``moka-serve --plain``: the engine users
compare with, whose base requests pay nothing for adapters being enabled). The adapter server is
started and the plugin's resolver pointed at a folder of seeded random adapters
(random weights cost what trained ones cost); it adapts only the ``--targets`` layers (vLLM's
``--lora-target-modules``, as one serves adapters that all target them; ``--all-layers`` for
vLLM's default of every linear layer, whose untargeted layers then run an empty adapter op).
Every adapter is requested once before timing, so each sits in vLLM's CPU cache
(``max_cpu_loras`` holds them all) and timing measures serving, not disk. Then, ``--repeats``
times, every configuration runs the same workload in turn (base requests first in each block
of N, so slow drift of the machine hits all of them alike); each
configuration's TPOT and TTFT p50 are divided by the base run of the same repeat (and by the
plain engine's run of the same repeat), and the reported ratio is the median over repeats.

Also measured: cold load (TTFT of the first request to never-seen adapters, found on disk by the
resolver, minus TTFT of the same request once warm), the bytes each adapter holds (parameters x
dtype size: what the CPU cache keeps and what is copied into a device slot) and what the engine
keeps per slot (vLLM's LoRA buffers in every slot; MoKA storage as a MoKA adapter uses it).

Results: ``<out-dir>/<name>.json`` (everything, including every run's full summary),
``<name>.md`` (the tables) and ``<name>.png`` (TPOT and TTFT ratio against N, per method).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from .report import machine, summarize
from .serve import BenchError, run_requests
from .server import free_port, running_server
from .workload import WorkloadConfig

# Runs against the engine started without --enable-lora (the others share the adapter engine).
PLAIN = "plain"
# Adapter methods: ``moka-rR`` is what ``moka-train`` makes by default at a rank-R LoRA's size
# (``--budget lora-R``: the ``mixed`` family, one balanced Kronecker term and R-1 rank-1 terms
# on SmolLM2's q/v); ``moka-kron`` the ``kron`` family (``--moka-components`` balanced terms,
# what every serving number before the mixed family measured); ``loraR`` a rank-R LoRA.
DEFAULT_METHODS = "plain,base,moka-r2,moka-r4,moka-r8,moka-kron,lora2,lora4,lora8,lora16"
MAX_LORA_RANK = 16  # the adapter engine's --max-lora-rank


def method_kind(method: str) -> tuple[str, int]:
    """``(kind, rank)``: kind is plain, base, lora, moka-mixed or moka-kron; rank is the LoRA
    rank (of the LoRA, or whose size a mixed MoKA has), 0 where none. ValueError if unknown."""
    if method in (PLAIN, "base", "moka-kron"):
        return method, 0
    for prefix, kind in (("lora", "lora"), ("moka-r", "moka-mixed")):
        rank = method.removeprefix(prefix)
        if method.startswith(prefix) and rank.isdigit() and 1 <= int(rank) <= MAX_LORA_RANK:
            return kind, int(rank)
    renamed = " ('moka' is now 'moka-kron')" if method == "moka" else ""
    raise ValueError(
        f"unknown method {method!r}{renamed}: plain, base, moka-kron, moka-rR or loraR (R from "
        f"1 to {MAX_LORA_RANK})"
    )


def same_size_lora(method: str) -> str | None:
    """The LoRA whose parameter count a ``moka-rR`` adapter matches (``loraR``), else None."""
    kind, rank = method_kind(method)
    return f"lora{rank}" if kind == "moka-mixed" else None


def add_compare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compare")
    g.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M)")
    g.add_argument("--quantize", choices=["none", "4bit"], default="none")
    g.add_argument("--dtype", default=None, help="float32 (none) / bfloat16 (4bit) by default")
    g.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="plain = base requests to a second engine started without --enable-lora; "
        "moka-rR = moka-train's default (mixed) adapter at a rank-R LoRA's size; moka-kron = "
        "--moka-components balanced Kronecker terms; loraR = a rank-R LoRA",
    )
    g.add_argument("--num-adapters", default="1,8,64", help="comma-separated N")
    g.add_argument("--popularities", default="distinct,skewed")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--targets", default="q_proj,v_proj")
    g.add_argument(
        "--all-layers",
        action="store_true",
        help="adapt every linear layer (vLLM's default); without it the adapter engine adapts "
        "only --targets (vLLM's --lora-target-modules), as an engine serving such adapters is run",
    )
    g.add_argument("--moka-components", type=int, default=4, help="moka-kron's terms")
    g.add_argument("--cold-loads", type=int, default=4, help="never-seen adapters per method")
    g.add_argument("--adapters-dir", type=Path, default=None, help="default: a cache folder")
    g.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    g.add_argument("--name", default=None, help="file stem (default: compare-<quantize>)")
    g.add_argument("--max-model-len", type=int, default=512)
    g.add_argument("--start-timeout", type=float, default=600.0)
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="TP size of both engines")
    g.add_argument("--server-arg", action="append", default=[], help="extra vLLM option")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def moka_shapes(dims: dict, layers: int, targets: list[str], method: str, components: int) -> dict:
    """Component shapes per target of a ``moka-*`` method, as ``moka-train`` plans them:
    ``moka-rR`` with ``--budget lora-R`` (the default ``mixed`` family), ``moka-kron`` the
    cheapest diverse set of ``components`` balanced terms (``--shape-family kron``)."""
    from moka_core.shapes import plan_lora_sized, plan_shapes

    kind, rank = method_kind(method)
    layer_dims = {t: dims[t] for t in targets}
    counts = {t: layers for t in targets}
    if kind == "moka-mixed":
        shapes = plan_lora_sized(layer_dims, counts, rank)
    else:
        shapes, _ = plan_shapes(layer_dims, counts, num_components=components, budget=None)
    return {t: [c.as_list() for c in cs] for t, cs in shapes.items()}


def adapter_params(method: str, dims: dict, layers: int, targets: list[str], shapes: dict) -> int:
    """Trainable parameters of one adapter of ``method`` (``shapes``: its ``moka_shapes``;
    gate logits included for MoKA with more than one component, as ``moka-train`` gates)."""
    from moka_core.adapter_format import ComponentShape
    from moka_core.shapes import module_params

    kind, rank = method_kind(method)
    if kind.startswith("moka"):
        comps = {t: [ComponentShape(*c) for c in shapes[t]] for t in targets}
        return layers * sum(module_params(c, "moka", gating=len(c) > 1) for c in comps.values())
    return layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def slot_reservation_bytes(
    dims: dict,
    layers: int,
    max_rank: int,
    elt: int,
    tp: int = 1,
    moka_bytes: int = 0,
    vocab: int | None = None,
) -> dict[str, int]:
    """Bytes one rank keeps per adapter slot: vLLM's LoRA buffers at ``max_rank``
    (:func:`moka_core.slots.lora_slot_bytes`), whatever the adapters; and the MoKA storage a
    slot holding a MoKA adapter of ``moka_bytes`` uses (on CPU the packed copy, grown on demand;
    ``moka_kernels.bank``)."""
    from moka_core.slots import lora_slot_bytes

    return {"lora": lora_slot_bytes(dims, layers, vocab, max_rank, elt, tp), "moka": moka_bytes}


def write_adapters(root: Path, base: Path, names: dict[str, str], spec: dict) -> None:
    """Write every adapter named in ``names`` (name -> method) that is not on disk yet."""
    from .random_adapters import random_moka, write_moka, write_random_lora

    for i, (name, method) in enumerate(sorted(names.items())):
        folder = root / name
        if (folder / "adapter_config.json").is_file():
            continue
        seed = 1000 + i
        tmp = root / f".{name}.tmp"
        kind, rank = method_kind(method)
        if kind.startswith("moka"):
            shapes = spec["shapes"][method]
            gating = max(len(v) for v in shapes.values()) > 1  # moka-train: no gate for one
            adapter = random_moka(shapes, seed=seed, dims=spec["dims"], layers=spec["layers"],
                                  std=0.05, base_model=str(base), gating=gating)  # fmt: skip
            write_moka(tmp, adapter)
        else:
            write_random_lora(tmp, spec["targets"], seed=seed, dims=spec["dims"],
                              layers=spec["layers"], r=rank, std=0.02,
                              base_model=str(base))  # fmt: skip
        tmp.rename(folder)


def server_command(
    args, base: Path, adapters: Path | None, port: int, max_cpu_loras: int
) -> tuple[list[str], dict, str]:
    """The ``moka-serve`` command for the run: no static adapters, the resolver finds them all.

    ``adapters=None``: the plain engine (``moka-serve --plain``: no ``--enable-lora``), with
    the same base, dtype and scheduler settings.
    """
    from moka_serve.cli import build_command, build_parser

    dtype = args.dtype or ("bfloat16" if args.quantize == "4bit" else "float32")
    plain = ["--plain"] if adapters is None else []
    serve_args = build_parser().parse_args(
        ["--base", str(base), "--quantize", args.quantize, *plain]
    )
    rest = [
        "--dtype", dtype, "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.concurrency),
        "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
        "--tensor-parallel-size", str(args.tensor_parallel_size), *args.server_arg,
    ]  # fmt: skip
    if adapters is not None:
        rest += ["--max-loras", str(args.concurrency), "--max-cpu-loras", str(max_cpu_loras),
                 "--max-lora-rank", str(MAX_LORA_RANK)]  # fmt: skip
        if not args.all_layers:
            rest += ["--lora-target-modules", *_csv(args.targets)]
    cmd, env = build_command(serve_args, rest)
    if adapters is not None:
        env["MOKA_ADAPTER_DIR"] = str(adapters)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return cmd, env, dtype


def run_config(url: str, models: list[str], cfg: WorkloadConfig, args) -> dict:
    """One run's summary; any failed request stops the comparison (a ratio would be wrong)."""
    results, wall = run_requests(
        url, models, cfg, concurrency=args.concurrency, progress=False, timeout_s=args.timeout
    )
    summary = summarize(results, wall)
    if summary["requests"]["failed"]:
        bad = next(r.error for r in results if not r.ok)
        raise BenchError(f"{summary['requests']['failed']} request(s) failed, e.g.: {bad}")
    return summary


def measure_cold_loads(url: str, names: list[str], args) -> dict:
    """TTFT of a short request to each never-seen adapter, then again once it is warm.

    The prompt is 8 tokens whatever the workload's: the load time is the difference of two
    TTFTs, and a long prefill would bury it in its own noise.
    """
    cfg = WorkloadConfig(num_requests=1, input_len="8", output_len="2",
                         token_range=args.token_range, seed=args.seed)  # fmt: skip
    cold, warm = [], []
    for name in names:
        for into in (cold, warm):
            s = run_config(url, [name], cfg, args)
            into.append(s["ttft_ms"]["p50"])
    return {
        "adapters": names,
        "cold_ttft_ms": cold,
        "warm_ttft_ms": warm,
        "cold_load_ms_median": statistics.median(c - w for c, w in zip(cold, warm, strict=True)),
    }


def plan_configs(methods: list[str], ns: list[int], pops: list[str]) -> list[tuple]:
    """``(method, N, popularity)`` per run of one repeat; each block of N starts with the plain
    engine's and the adapter engine's base requests.

    With N = 1 every popularity sends all requests to the one adapter, so only the first is run.
    """
    runs = []
    for n in ns:
        runs += [(m, n, "-") for m in (PLAIN, "base") if m in methods]
        for pop in pops[:1] if n == 1 else pops:
            runs += [(m, n, pop) for m in methods if m not in (PLAIN, "base")]
    return runs


def cmd_compare(args: argparse.Namespace) -> int:
    from moka_core.base_models import cache_dir, llama_dims, materialize_default_base
    from moka_core.slots import DTYPE_BYTES, vocab_size

    from .plot import plot_ratios

    methods, pops = _csv(args.methods), _csv(args.popularities)
    ns = sorted({int(n) for n in _csv(args.num_adapters)})
    try:
        for m in methods:
            method_kind(m)
    except ValueError as e:
        raise BenchError(f"--methods: {e}") from None
    if not ns or min(ns) < 1 or args.repeats < 1:
        raise BenchError("--num-adapters and --repeats must be positive")
    if args.cold_loads < 0:
        raise BenchError("--cold-loads must be 0 (no cold-load figure) or more")
    base = Path(args.base) if args.base else materialize_default_base()
    dims, layers = llama_dims(base)
    targets = _csv(args.targets)
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise BenchError(f"unknown --targets {unknown}; choose from {sorted(dims)}")
    shapes = {m: moka_shapes(dims, layers, targets, m, args.moka_components)
              for m in methods if m.startswith("moka")}  # fmt: skip
    spec = {"dims": dims, "layers": layers, "targets": targets, "shapes": shapes}
    adapters = args.adapters_dir or cache_dir() / "bench-adapters" / base.name
    adapters.mkdir(parents=True, exist_ok=True)
    adapter_methods = [m for m in methods if m not in (PLAIN, "base")]
    names = {f"{m}-{i}": m for m in adapter_methods for i in range(max(ns))}
    cold = {m: [f"cold-{m}-{time.time_ns()}-{i}" for i in range(args.cold_loads)]
            for m in adapter_methods}  # fmt: skip
    print(f"# writing {len(names)} adapters to {adapters} (skipping those already there)")
    write_adapters(adapters, base, names, spec)
    write_adapters(adapters, base, {n: m for m, ns_ in cold.items() for n in ns_}, spec)

    stem = args.out_dir / (args.name or f"compare-{args.quantize}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # vLLM's CPU cache holds every adapter, the cold ones too: a cold load then measures loading,
    # not the eviction of the least recently used adapter as well.
    cpu_loras = len(names) + sum(len(c) for c in cold.values()) + 8
    cmd, env, dtype = server_command(args, base, adapters, port, cpu_loras)
    runs = plan_configs(methods, ns, pops)
    base_name = str(base)
    summaries: dict[tuple, list[dict]] = {r: [] for r in runs}
    t_start = time.time()
    try:
        with contextlib.ExitStack() as stack:
            t0 = time.time()
            url = stack.enter_context(
                running_server(cmd, env, Path(f"{stem}.server.log"), port, args.start_timeout)
            )
            start_s = {"adapter": time.time() - t0}
            plain_url = None
            if PLAIN in methods:  # started second: the two never compile at the same time
                plain_port = free_port()
                plain_cmd, plain_env, _ = server_command(args, base, None, plain_port, 0)
                t0 = time.time()
                plain_url = stack.enter_context(
                    running_server(
                        plain_cmd,
                        plain_env,
                        Path(f"{stem}.plain-server.log"),
                        plain_port,
                        args.start_timeout,
                    )  # fmt: skip
                )
                start_s[PLAIN] = time.time() - t0
            print(f"# servers up ({', '.join(f'{k} {v:.0f} s' for k, v in start_s.items())}); "
                  f"warming {len(names)} adapters")  # fmt: skip
            warm_cfg = WorkloadConfig(num_requests=len(names) or 1, batch=args.concurrency,
                                      input_len="8", output_len="2", seed=args.seed)  # fmt: skip
            run_config(url, sorted(names) or [base_name], warm_cfg, args)
            cold_loads = {m: measure_cold_loads(url, cold[m], args)
                          for m in adapter_methods if cold[m]}  # fmt: skip
            for rep in range(args.repeats):
                for k, (method, n, pop) in enumerate(runs):
                    on_base = method in (PLAIN, "base")
                    models = [base_name] if on_base else [f"{method}-{i}" for i in range(n)]
                    cfg = _workload(args, pop if pop != "-" else "identical", rep)
                    s = run_config(plain_url if method == PLAIN else url, models, cfg, args)
                    summaries[(method, n, pop)].append(s)
                    print(f"# repeat {rep + 1}/{args.repeats} run {k + 1}/{len(runs)} "
                          f"{method:6s} N={n:<4d} {pop:8s} TPOT p50 {s['tpot_ms']['p50']:.1f} ms "
                          f"TTFT p50 {s['ttft_ms']['p50']:.1f} ms", flush=True)  # fmt: skip
    finally:
        for names_ in cold.values():  # cold adapters are single-use
            for n in names_:
                _rmtree(adapters / n)
    rows = ratio_rows(summaries, runs, args.repeats)
    elt = DTYPE_BYTES.get(dtype, 4)
    params = {m: adapter_params(m, dims, layers, targets, shapes.get(m, {}))
              for m in adapter_methods}  # fmt: skip
    memory = {m: {"params": p, "adapter_bytes": p * elt} for m, p in params.items()}
    report = {
        "kind": "moka-bench compare",
        "command": shlex.join(["moka-bench", *sys.argv[1:]]),
        "machine": machine(),
        "base": base_name,
        "quantize": args.quantize,
        "dtype": dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "targets": targets,
        "all_layers": args.all_layers,
        "adapter_server_command": shlex.join(cmd),
        "moka_shapes": shapes,
        "concurrency": args.concurrency,
        "workload": _workload(args, "distinct", 0).to_dict(),
        "repeats": args.repeats,
        "wall_s": time.time() - t_start,
        "engine_start_s": start_s,
        "rows": rows,
        "cold_loads": cold_loads,
        "memory_per_adapter": memory,
        "slot_reservation_bytes": slot_reservation_bytes(
            dims,
            layers,
            16,
            elt,
            args.tensor_parallel_size,
            # packed float32 on CPU; the largest MoKA adapter run
            moka_bytes=max(
                (v["params"] for m, v in memory.items() if m.startswith("moka")), default=0
            )
            * 4,  # fmt: skip
            vocab=vocab_size(base),
        ),
        "runs": [
            {"method": m, "n": n, "popularity": p, "summaries": summaries[(m, n, p)]}
            for m, n, p in runs
        ],  # fmt: skip
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    md = compare_markdown(report)
    stem.with_suffix(".md").write_text(md, encoding="utf-8")
    weights = "4-bit NF4" if args.quantize == "4bit" else "unquantized"
    plot_ratios(rows, stem.with_suffix(".png"), f"{base.name}, {weights}, {dtype}")
    print(md)
    print(f"wrote {stem}.json, .md and .png")
    return 0


def _workload(args, popularity: str, rep: int) -> WorkloadConfig:
    """The timed workload; the seed changes per repeat (same for every configuration)."""
    from .workload import workload_config

    return workload_config(args, popularity, seed_offset=rep)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def ratio_rows(summaries: dict[tuple, list[dict]], runs: list[tuple], repeats: int) -> list[dict]:
    """Per configuration: median TPOT/TTFT p50 and the median over repeats of its ratio to the
    same repeat's base requests on the adapter engine (``tpot_ratio``, ``ttft_ratio``) and on
    the plain engine (``tpot_ratio_to_plain``, ``ttft_ratio_to_plain``); the reference runs of
    one repeat are pooled by their median. A ``moka-rR`` row also gets its ratio to the
    ``loraR`` run of the same N, popularity and repeat (``tpot_ratio_to_lora``, same size)."""
    refs = {"": "base", "_to_plain": PLAIN}
    rows = []
    for key in runs:
        method, n, pop = key
        row = {"method": method, "n": n, "popularity": pop}
        for metric in ("tpot_ms", "ttft_ms"):
            vals = [s[metric]["p50"] for s in summaries[key]]
            row[metric] = statistics.median(vals)
            for suffix, ref in refs.items():
                ref_keys = [r for r in runs if r[0] == ref]
                if not ref_keys:
                    continue
                ratios = []
                for rep in range(repeats):
                    b = statistics.median(summaries[k][rep][metric]["p50"] for k in ref_keys)
                    ratios.append(vals[rep] / b)
                row[metric.replace("_ms", "_ratio") + suffix] = statistics.median(ratios)
            lora = same_size_lora(method)
            if (lora, n, pop) in summaries:  # the LoRA of the same parameter count, same runs
                ratios = [
                    v / summaries[(lora, n, pop)][rep][metric]["p50"] for rep, v in enumerate(vals)
                ]
                row[metric.replace("_ms", "_ratio") + "_to_lora"] = statistics.median(ratios)
        row["output_tok_s"] = statistics.median(
            s["output_token_throughput"] for s in summaries[key]
        )
        rows.append(row)
    return rows


def compare_markdown(report: dict) -> str:
    """The README table: one row per (popularity, N, method), ratios to the adapter engine's
    base requests and to the plain engine (``-`` where that reference was not run).

    Base and plain rows are the runs of each block of N (their ratio to the pooled reference of
    the same repeat shows the run-to-run noise)."""
    lines = [
        f"`{report['command']}`  ",
        f"{report['machine']['processor']}, {report['machine']['cpus']} cpus; base "
        f"{Path(report['base']).name}, {report['quantize']}, {report['dtype']}, "
        f"TP={report.get('tensor_parallel_size', 1)}; targets "
        f"{','.join(report['targets'])} (adapted layers: "
        f"{'all' if report.get('all_layers') else 'the targets only'}); concurrency "
        f"{report['concurrency']}; median of {report['repeats']} interleaved repeats",
        "",
        "| popularity | N | method | TPOT p50 ms | TPOT / base | TPOT / plain | "
        "TPOT / same-size LoRA | TTFT p50 ms | TTFT / base | TTFT / plain | out tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if key in r else "-"

    for r in report["rows"]:
        lines.append(
            f"| {r['popularity']} | {r['n']} | {r['method']} | {r['tpot_ms']:.1f} | "
            f"{ratio(r, 'tpot_ratio')} | {ratio(r, 'tpot_ratio_to_plain')} | "
            f"{ratio(r, 'tpot_ratio_to_lora')} | {r['ttft_ms']:.1f} | {ratio(r, 'ttft_ratio')} | "
            f"{ratio(r, 'ttft_ratio_to_plain')} | "
            f"{r['output_tok_s']:.1f} |"
        )
    lines += ["", "| method | params/adapter | bytes/adapter | cold load ms (median) | "
              "per slot and rank: LoRA buffers (rank 16) + MoKA storage when a MoKA adapter "
              "is held |", "|---|---|---|---|---|"]  # fmt: skip
    res = report["slot_reservation_bytes"]
    for m, mem in report["memory_per_adapter"].items():
        cold = report["cold_loads"].get(m, {}).get("cold_load_ms_median")
        lines.append(
            f"| {m} | {mem['params']:,} | {mem['adapter_bytes'] / 1e6:.2f} MB | "
            f"{'-' if cold is None else f'{cold:.0f}'} | LoRA {res['lora'] / 1e6:.1f} MB + "
            f"MoKA {res['moka'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines) + "\n"
