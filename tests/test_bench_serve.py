"""``moka-bench serve`` and ``moka-bench compare`` end to end against real tiny-model servers.

``serve``: the CLI drives a running ``moka-serve`` (tiny Llama, CPU, float32) for a few seconds
over two MoKA adapters, a LoRA and the base; the report must have its structure and every request
must succeed with exactly the asked-for tokens. A run naming an adapter that does not exist must
record the failures, exit 1, and leave the server serving. ``compare`` runs its whole pipeline
once, tiny (N = 1, 2, one repeat), its two engines eager (they start in half the time; what
compilation changes is the plugin tests' subject). No timing assertions: speed is for
benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from vllm_helpers import (  # noqa: E402
    free_port,
    random_moka,
    running_server,
    write_moka,
    write_random_lora,
)

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300
BENCH = [sys.executable, "-m", "moka_serve.bench.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from moka_core.base_models import build_tiny_llama

    root = tmp_path_factory.mktemp("bench")
    base = build_tiny_llama(root / "tiny-llama", seed=0)
    served = root / "adapters"
    write_moka(served / "moka-a", random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=1))
    write_moka(served / "moka-b", random_moka({"v_proj": [[8, 16, 16, 16]]}, seed=2))
    write_random_lora(served / "lora-c", ["q_proj", "v_proj"], seed=3)
    port = free_port()
    cmd = [
        sys.executable, "-m", "moka_serve.cli", "--base", str(base), "--adapters", str(served),
        "--quantize", "none", "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
        "--max-loras", "2", "--max-lora-rank", "16", "--max-num-seqs", "8",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with running_server(cmd, env, root / "server.log", port, START_TIMEOUT_S) as url:
        yield {"url": url, "root": root, "base": base}


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BENCH, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def test_serve_reports_every_request_of_a_mixed_workload(server, tmp_path):
    out = tmp_path / "report.json"
    p = _bench(
        "serve", "--base-url", server["url"], "--adapters", "all", "--num-requests", "12",
        "--concurrency", "4", "--popularity", "skewed", "--input-len", "uniform:4:24",
        "--output-len", "5", "--seed", "3", "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"moka-a", "moka-b", "lora-c"}
    s = report["summary"]
    assert s["requests"] == {"total": 12, "ok": 12, "failed": 0}
    assert s["output_tokens"] == 12 * 5
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[metric]) == {"mean", "p50", "p90", "p99"}
        assert all(v is not None and v > 0 for v in s[metric].values()), metric
    assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0
    assert len(report["results"]) == 12
    assert all(r["ok"] and r["output_tokens"] == 5 for r in report["results"])
    assert {r["model"] for r in report["results"]} <= set(report["models"])
    assert report["workload"]["popularity"] == "skewed" and report["machine"]["cpus"]
    md = out.with_suffix(".md").read_text()
    assert "12/12 ok" in md and "| ttft_ms |" in md
    assert "| e2e_ms |" in p.stdout


def test_serve_open_loop_on_the_base_model(server):
    p = _bench(
        "serve", "--base-url", server["url"], "--num-requests", "6", "--request-rate", "20",
        "--burstiness", "1", "--output-len", "3", "--input-len", "8", "--no-progress",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "6/6 ok" in p.stdout


def test_unknown_adapter_is_recorded_as_failed_and_the_server_lives_on(server, tmp_path):
    out = tmp_path / "bad.json"
    p = _bench(
        "serve", "--base-url", server["url"], "--adapters", "moka-a", "no-such-adapter",
        "--num-requests", "4", "--concurrency", "2", "--output-len", "3", "--input-len", "8",
        "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert p.returncode == 1
    assert "request failed" in p.stderr and "Traceback" not in p.stderr
    s = json.loads(out.read_text())["summary"]
    assert s["requests"] == {"total": 4, "ok": 2, "failed": 2}
    with urllib.request.urlopen(server["url"] + "/health", timeout=5) as r:
        assert r.status == 200


def test_serve_without_a_server_is_a_clear_error():
    p = _bench("serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--no-progress")
    assert p.returncode == 2
    assert "cannot list models" in p.stderr and "Traceback" not in p.stderr


def test_compare_end_to_end_tiny(server, tmp_path):
    p = _bench(
        "compare", "--base", str(server["base"]), "--num-adapters", "1,2", "--repeats", "1",
        "--methods", "plain,base,moka-r2,lora2", "--num-requests", "4", "--concurrency", "2",
        "--input-len", "8", "--output-len", "4", "--cold-loads", "1", "--max-model-len", "128",
        "--adapters-dir", str(tmp_path / "adapters"), "--out-dir", str(tmp_path / "out"),
        "--name", "tiny", "--server-arg=--enforce-eager", timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    report = json.loads((tmp_path / "out" / "tiny.json").read_text())
    keys = [(r["method"], r["n"], r["popularity"]) for r in report["rows"]]
    assert keys == [
        ("plain", 1, "-"), ("base", 1, "-"), ("moka-r2", 1, "distinct"), ("lora2", 1, "distinct"),
        ("plain", 2, "-"), ("base", 2, "-"), ("moka-r2", 2, "distinct"), ("lora2", 2, "distinct"),
        ("moka-r2", 2, "skewed"), ("lora2", 2, "skewed"),
    ]  # fmt: skip
    for r in report["rows"]:
        assert r["tpot_ratio"] > 0 and r["ttft_ratio"] > 0 and r["output_tok_s"] > 0
        assert r["tpot_ratio_to_plain"] > 0 and r["ttft_ratio_to_plain"] > 0
    assert set(report["engine_start_s"]) == {"adapter", "plain"}
    for run in report["runs"]:
        assert all(s["requests"]["failed"] == 0 for s in run["summaries"])
    assert set(report["cold_loads"]) == {"moka-r2", "lora2"}
    assert report["memory_per_adapter"]["moka-r2"]["params"] > 0
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 1000
    assert "| distinct | 2 | moka-r2 |" in (tmp_path / "out" / "tiny.md").read_text()
    # moka-train's rank-2-sized adapter, beside the rank-2 LoRA of (about) its size
    assert all(r["tpot_ratio_to_lora"] > 0 for r in report["rows"] if r["method"] == "moka-r2")
    assert report["moka_shapes"]["moka-r2"]["q_proj"][1] == [256, 1, 1, 256]
    # cold adapters are removed after the run; the timed ones stay for the next run
    left = sorted(d.name for d in (tmp_path / "adapters").iterdir())
    assert left == ["lora2-0", "lora2-1", "moka-r2-0", "moka-r2-1"]


def test_admin_endpoints_are_off_without_an_admin_key(server):
    """This server has no admin key: loading and unloading answer 403 and change nothing, and
    the inventory shows no server path (issue #22)."""
    import urllib.error

    def models() -> set[str]:
        with urllib.request.urlopen(server["url"] + "/v1/models") as r:
            return {m["id"] for m in json.load(r)["data"]}

    before = models()
    folder = server["root"] / "adapters" / "moka-a"
    for path, body in (
        ("/v1/load_lora_adapter", {"lora_name": "moka-new", "lora_path": str(folder)}),
        ("/v1/unload_lora_adapter", {"lora_name": "moka-a"}),
    ):
        req = urllib.request.Request(
            server["url"] + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-Moka-Admin-Key": "guess"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req)
        assert err.value.code == 403
        assert "adapter administration is off" in err.value.read().decode()
    assert models() == before
    with urllib.request.urlopen(server["url"] + "/v1/moka/adapters") as r:
        raw = r.read().decode()
    assert "moka-a" in raw and str(server["root"]) not in raw
    # The resolver needs no admin endpoint: a folder copied into the adapters folder is served.
    shutil.copytree(folder, server["root"] / "adapters" / "moka-a-copy")
    req = urllib.request.Request(
        server["url"] + "/v1/completions",
        data=json.dumps({"model": "moka-a-copy", "prompt": [1, 2, 3], "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        assert r.status == 200 and json.load(r)["model"] == "moka-a-copy"
