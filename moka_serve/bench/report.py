"""Turn request results into the numbers peers report, as JSON and a Markdown table.

Latencies in milliseconds: TTFT, TPOT (per request), ITL (every gap between streamed chunks of
every request) and end-to-end, each as mean / p50 / p90 / p99 over successful requests;
throughput as requests/s and output tokens/s over the run's wall time.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from .client import RequestResult

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
PERCENTILES = (50, 90, 99)


def stats(values: list[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 (linear interpolation, as numpy); None for an empty list."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return out


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """The report's ``summary``: request counts, latency statistics and throughput."""
    ok = [r for r in results if r.ok]
    ms = 1000.0
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": {"total": len(results), "ok": len(ok), "failed": len(results) - len(ok)},
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_token_throughput": out_tokens / wall_s if wall_s > 0 else 0.0,
        "output_tokens": out_tokens,
        "ttft_ms": stats([r.ttft_s * ms for r in ok if r.ttft_s is not None]),
        "tpot_ms": stats([r.tpot_s * ms for r in ok if r.tpot_s is not None]),
        "itl_ms": stats([g * ms for r in ok for g in r.itl_s]),
        "e2e_ms": stats([r.e2e_s * ms for r in ok if r.e2e_s is not None]),
    }


def machine() -> dict:
    """Where the numbers were taken (CPU model, cores, versions)."""
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    for mod in ("torch", "vllm", "openai"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is just left out
            pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def errors(results: list[RequestResult], limit: int = 5) -> list[str]:
    """The first few distinct error messages, so a failed run says why."""
    seen: list[str] = []
    for r in results:
        if r.error and r.error not in seen:
            seen.append(r.error)
    return seen[:limit]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(summary: dict, title: str | None = None) -> str:
    """One table: a row per latency metric, a column per statistic, then throughput lines."""
    lines = [f"### {title}", ""] if title else []
    req = summary["requests"]
    lines += [
        f"requests: {req['ok']}/{req['total']} ok, {summary['duration_s']:.1f} s, "
        f"{summary['request_throughput']:.2f} req/s, "
        f"{summary['output_token_throughput']:.1f} output tok/s",
        "",
        "| metric | mean | p50 | p90 | p99 |",
        "|---|---|---|---|---|",
    ]
    for m in METRICS:
        s = summary[m]
        lines.append(
            f"| {m} | {_fmt(s['mean'])} | "
            + " | ".join(_fmt(s[f"p{p}"]) for p in PERCENTILES)
            + " |"
        )
    return "\n".join(lines) + "\n"
