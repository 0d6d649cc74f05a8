"""``moka-bench soak``, short: a real server over the tiny Llama with constant eviction while the
fault injector breaks, restores and adds folders and unloads/reloads adapters (issue #9).

The full soak (SmolLM2, 200 adapters, 64 streams, 10 minutes) is in docs/reliability.md; this one
runs 30 s in CI (about 60 faults, hundreds of requests) and must pass on the same rules: no engine death, no failure of a request for
a valid adapter, every failure a 4xx for a folder broken while its request ran, one greedy text
per (adapter, prompt), and no traceback in the server's log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from moka_serve.bench.soak import FolderHistory  # noqa: E402

pytestmark = pytest.mark.slow


def test_folder_history_says_when_a_folder_was_broken(monkeypatch):
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    h = FolderHistory()
    h.mark("a", True)  # broken at 10
    h.mark("a", False)  # restored at 20
    h.mark("a", True)  # broken at 30
    assert not h.broken_during("a", 1, 9)
    assert h.broken_during("a", 5, 12) and h.broken_during("a", 12, 15)
    assert not h.broken_during("a", 21, 29)
    assert h.broken_during("a", 25, 31) and h.broken_during("a", 40, 50)
    assert not h.broken_during("b", 0, 100)


def test_short_soak_passes(tmp_path):
    from moka_core.base_models import tiny_llama_dir

    out = tmp_path / "soak"
    cmd = [
        sys.executable, "-m", "moka_serve.bench.cli", "soak",
        "--base", str(tiny_llama_dir()), "--num-moka", "18", "--num-lora", "6",
        "--streams", "16", "--duration", "30", "--max-loras", "2", "--max-cpu-loras", "4",
        "--fault-interval", "0.5", "--faulty-fraction", "0.3",
        "--adapters-cache", str(tmp_path / "pristine"), "--out", str(out),
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = out.with_suffix(".server.log").read_text(errors="replace")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + log[-3000:]
    f = json.loads(out.with_suffix(".json").read_text())["figures"]
    assert f["passed"] and f["unexpected_failures"] == 0 and f["unhealthy_polls"] == 0
    assert f["mismatched_outputs"] == 0 and f["admin_5xx"] == 0 and f["admin_refused"] == 0
    assert f["admin_statuses"].get("200", 0) > 0, f  # unloads and reloads went through
    assert f["requests_ok"] > 100, f
    assert f["failed_for_broken_adapters"] > 0, f  # the faults reached the server
    serving = log.split("[shutdown]")[0]  # vLLM may log its own teardown of a killed engine
    assert "Traceback" not in serving
    assert "adapter rejected: Invalid adapter" in log
