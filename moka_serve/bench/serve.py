"""``moka-bench serve``: one workload against one running server, reported as JSON + Markdown."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

from .client import RequestResult, run_workload
from .report import errors, machine, markdown, summarize
from .workload import WorkloadConfig, build_workload


class BenchError(RuntimeError):
    """A problem the user can fix (unreachable server, unknown adapter); printed, no traceback."""


def list_models(base_url: str, api_key: str = "none", timeout_s: float = 10.0) -> list[dict]:
    """The server's ``/v1/models`` entries (the base first in vLLM; adapters have a ``parent``)."""
    req = urllib.request.Request(
        base_url.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())["data"]
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"cannot list models at {base_url}/v1/models: {e}") from e


def choose_models(base_url: str, adapters: list[str] | None, api_key: str = "none") -> list[str]:
    """Model names to send requests to.

    No ``adapters``: the base model (the first entry without a parent). ``["all"]``: every
    adapter the server lists. Otherwise the names as given: names the server does not list yet
    are kept (a resolver may find them on their first request, which is what cold-load
    measurements want).
    """
    if adapters and adapters != ["all"]:
        return list(adapters)
    entries = list_models(base_url, api_key)
    if adapters == ["all"]:
        names = [m["id"] for m in entries if m.get("parent")]
        if not names:
            raise BenchError(f"the server at {base_url} lists no adapters")
        return names
    bases = [m["id"] for m in entries if not m.get("parent")]
    if not bases:
        raise BenchError(f"the server at {base_url} lists no base model")
    return bases[:1]


def run_requests(
    base_url: str,
    models: list[str],
    cfg: WorkloadConfig,
    *,
    concurrency: int,
    progress: bool = True,
    timeout_s: float = 600.0,
    api_key: str = "none",
) -> tuple[list[RequestResult], float]:
    """Build ``cfg``'s requests over ``models`` and send them; results and the wall time."""
    specs = build_workload(cfg, models)
    return asyncio.run(
        run_workload(base_url, specs, concurrency=concurrency, timeout_s=timeout_s,
                     api_key=api_key, progress=progress)
    )  # fmt: skip


def run_serve(
    base_url: str,
    models: list[str],
    cfg: WorkloadConfig,
    *,
    concurrency: int,
    progress: bool = True,
    timeout_s: float = 600.0,
    api_key: str = "none",
) -> dict:
    """Build the workload, run it, and return the full report (config, summary, per request)."""
    results, wall = run_requests(
        base_url, models, cfg, concurrency=concurrency, progress=progress,
        timeout_s=timeout_s, api_key=api_key,
    )  # fmt: skip
    return {
        "kind": "moka-bench serve",
        "base_url": base_url,
        "models": models,
        "concurrency": concurrency,
        "workload": cfg.to_dict(),
        "machine": machine(),
        "summary": summarize(results, wall),
        "errors": errors(results),
        "results": [
            {
                "index": r.index,
                "model": r.model,
                "ok": r.ok,
                "error": r.error,
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "start_s": r.start_s,
                "ttft_s": r.ttft_s,
                "tpot_s": r.tpot_s,
                "e2e_s": r.e2e_s,
            }
            for r in results
        ],
    }


def write_report(report: dict, out: Path, title: str) -> Path:
    """Write ``out`` (JSON) and the Markdown table beside it (``.md``); return the .md path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(markdown(report["summary"], title), encoding="utf-8")
    return md
