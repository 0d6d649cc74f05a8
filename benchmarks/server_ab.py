#!/usr/bin/env python
"""A/B of adapter-engine configurations through real servers, against the plain engine.

Starts one ``moka-serve --plain`` server and one adapter server per configuration (the same
command ``moka-bench compare`` builds, plus each configuration's extra vLLM options), then, per
repeat, runs the same workload on each in turn: base requests on the plain engine, the adapters
named by ``--models`` on the others (``--models`` empty: base requests everywhere). Prints every
run's TPOT p50 and, per configuration, the median over repeats of its ratio to the same repeat's
plain run. What the 2026-12-03 (last) section of docs/benchmarks.md measured with::

    python benchmarks/server_ab.py --models moka-r8-{0..7} \\
        --config "" --config "--lora-target-modules q_proj v_proj" [--warm 384]

Adapters come from ``moka-bench compare``'s cache folder (run it once first); ``--warm N``
requests the first N of them on every adapter server before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
from pathlib import Path

from moka_core.base_models import cache_dir, materialize_default_base
from moka_serve.bench import compare
from moka_serve.bench.cli import build_parser
from moka_serve.bench.server import free_port, running_server
from moka_serve.bench.workload import WorkloadConfig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", action="append", default=[], help="extra vLLM options, quoted")
    p.add_argument("--models", nargs="*", default=[], help="adapter names (none: base requests)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warm", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    a = p.parse_args()
    args = build_parser().parse_args(
        ["compare", "--num-requests", "32", "--concurrency", "8", "--input-len", "64",
         "--output-len", "32", "--all-layers"]
    )  # fmt: skip
    base = materialize_default_base()
    adapters = cache_dir() / "bench-adapters" / base.name
    names = sorted(d.name for d in adapters.iterdir() if not d.name.startswith((".", "cold")))
    tpot: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        urls = {}
        for i, config in enumerate(["plain", *a.config]):
            port = free_port()
            if config == "plain":
                cmd, env, _ = compare.server_command(args, base, None, port, 0)
            else:
                cmd, env, _ = compare.server_command(args, base, adapters, port, len(names) + 8)
                cmd += shlex.split(config)
            log = a.log_dir / f"server_ab-{i}.log"
            urls[config] = stack.enter_context(running_server(cmd, env, log, port, 900))
            tpot[config] = []
            if config != "plain" and a.warm:
                warm = WorkloadConfig(num_requests=a.warm, batch=8, input_len="8", output_len="2")
                compare.run_config(urls[config], names[: a.warm], warm, args)
        for rep in range(a.repeats):
            for config, url in urls.items():
                on_base = config == "plain" or not a.models
                cfg = compare._workload(args, "identical" if on_base else "distinct", rep)
                models = [str(base)] if on_base else a.models
                s = compare.run_config(url, models, cfg, args)
                tpot[config].append(s["tpot_ms"]["p50"])
                print(f"{rep} {config or '(default)':45s} TPOT p50 {tpot[config][-1]:.2f} ms")
    for config, values in tpot.items():
        ratios = [v / p for v, p in zip(values, tpot["plain"], strict=True)]
        print(
            f"{config or '(default)':45s} median TPOT {statistics.median(values):.2f} ms, "
            f"x plain {statistics.median(ratios):.3f} {[round(r, 3) for r in ratios]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
