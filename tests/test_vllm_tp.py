"""Tensor parallelism (TP=2) end to end: ``moka-serve --tensor-parallel-size 2`` on CPU.

One TP=2 server for the module (compiled, two CPU workers, one core each: ``moka-serve`` sets
``VLLM_CPU_OMP_THREADS_BIND`` itself), over a tiny Llama whose widths make most adapter factors
straddle the shard boundaries: q is 192 wide (96 per rank) with ``m2 = 64`` blocks, gate/up 384
(192 per rank) with ``m2 = 128``, o_proj/down_proj read 96/192 of 192/384 input columns with
``n2 = 64``/``128``; one KV head, so k and v are replicated on both ranks (vLLM's head
assignment, not a split). ``max_loras=2 < max_cpu_loras=3 <`` the 4 adapters, so slots and the CPU
cache both evict (vLLM PR #20873 fixed wrong TP LoRA outputs with ``max_cpu_loras > 1``).

Every answer must equal the merged transformers reference token for token, logprobs within 1e-4,
for base, MoKA, MoKAs and LoRA requests in flight together (the TP=1 engine is held to the same
reference by ``test_vllm_plugin.py``, so TP=2 equals TP=1 without a third engine here).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_helpers import (  # noqa: E402
    LOGPROB_TOL,
    Reference,
    free_port,
    moka_deltas,
    random_moka,
    running_server,
    write_moka,
    write_random_lora,
)

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
START_TIMEOUT_S = 400
MODEL = {"hidden_size": 192, "num_heads": 6, "num_kv_heads": 1, "intermediate_size": 384}
DIMS = {
    "q_proj": (192, 192),
    "k_proj": (32, 192),
    "v_proj": (32, 192),
    "o_proj": (192, 192),
    "gate_proj": (384, 192),
    "up_proj": (384, 192),
    "down_proj": (192, 384),
}
NAMES = ["moka-attn", "mokas-unaligned", "moka-mlp", "lora-qvdown"]


def _adapters(folder):
    """name -> dense deltas; factor shapes chosen to cut across the TP=2 shard boundaries."""
    kw = {"dims": DIMS, "layers": 4}
    out = {}
    a = random_moka(
        {
            "q_proj": [[3, 12, 64, 16], [1, 192, 192, 1], [192, 1, 1, 192]],
            "k_proj": [[2, 16, 16, 12]],
            "v_proj": [[1, 8, 32, 24]],
            "o_proj": [[8, 3, 24, 64]],
        },
        seed=31,
        **kw,
    )
    write_moka(folder / "moka-attn", a)
    out["moka-attn"] = moka_deltas(a)
    b = random_moka(  # identity A: I_3 (x) B, a rank holds 1.5 of its 3 blocks
        {"q_proj": [[3, 3, 64, 64]], "o_proj": [[3, 3, 64, 64]], "down_proj": [[6, 6, 32, 64]]},
        seed=32,
        variant="mokas",
        std=0.3,
        **kw,
    )
    write_moka(folder / "mokas-unaligned", b)
    out["mokas-unaligned"] = moka_deltas(b)
    c = random_moka(
        {
            "gate_proj": [[3, 16, 128, 12]],
            "up_proj": [[384, 1, 1, 192], [12, 12, 32, 16]],
            "down_proj": [[16, 3, 12, 128]],
        },
        seed=33,
        **kw,
    )
    write_moka(folder / "moka-mlp", c)
    out["moka-mlp"] = moka_deltas(c)
    out["lora-qvdown"] = write_random_lora(
        folder / "lora-qvdown", ["q_proj", "v_proj", "down_proj"], seed=34, **kw
    )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moka_core.base_models import build_tiny_llama

    root = tmp_path_factory.mktemp("tp")
    base = build_tiny_llama(root / "tiny-llama-tp", seed=5, **MODEL)
    served = root / "adapters"
    served.mkdir()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    texts = ["The quick brown fox", "Once upon a time", "12 + 7 = 19, and 3 * 4 ="]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {"root": root, "base": base, "served": served, "deltas": _adapters(served),
            "prompts": prompts}  # fmt: skip


JOBS = [(name, p) for p in range(3) for name in [None, *NAMES]]


@pytest.fixture(scope="module")
def server(setup):
    port = free_port()
    log = setup["root"] / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    cmd = [
        sys.executable, "-m", "moka_serve.cli", "--base", str(setup["base"]),
        "--adapters", str(setup["served"]), "--quantize", "none", "--dtype", "float32",
        "--tensor-parallel-size", "2", "--max-model-len", "128", "--max-loras", "2",
        "--max-cpu-loras", "3", "--max-lora-rank", "16", "--max-num-seqs", "16", "--seed", "0",
        "--host", "127.0.0.1", "--port", str(port),
        "--admin-key", ADMIN_KEY, "--admin-root", str(setup["root"]),
    ]  # fmt: skip
    with running_server(cmd, env, log, port, START_TIMEOUT_S) as url:
        yield {"url": url, "log": log}


@pytest.fixture(scope="module")
def reference(setup) -> Reference:
    return Reference(setup["base"])


async def _complete(client, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    r = await client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    choice = r.choices[0]
    return list(choice.model_extra["token_ids"]), list(choice.logprobs.token_logprobs)


def _complete_all(server, jobs, model_of):
    async def go():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(*(_complete(client, model_of(n), p) for n, p in jobs))
        finally:
            await client.close()

    return asyncio.run(go())


def test_tp2_moka_only_engine_matches_reference(setup, reference):
    """A folder of MoKA adapters only: ``moka-serve`` starts a MoKA-only engine (no LoRA
    buffers, vLLM's LoRA ops never run) at TP=2; base and MoKA requests in flight together
    equal the merged reference, and a LoRA is refused with 400 while serving goes on. Runs
    before the module's mixed server starts (its own server stops at the end)."""
    import shutil

    folder = setup["root"] / "moka-only"
    names = [n for n in NAMES if not n.startswith("lora")]
    for name in names:
        shutil.copytree(setup["served"] / name, folder / name)
    port = free_port()
    log = setup["root"] / "server-moka-only.log"
    env = {
        k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_OMP_THREADS_BIND", "MOKA_ONLY")
    }
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    cmd = [
        sys.executable, "-m", "moka_serve.cli", "--base", str(setup["base"]),
        "--adapters", str(folder), "--quantize", "none", "--dtype", "float32",
        "--tensor-parallel-size", "2", "--max-model-len", "128", "--max-loras", "2",
        "--max-cpu-loras", "3", "--max-num-seqs", "16", "--seed", "0",
        "--host", "127.0.0.1", "--port", str(port),
        "--admin-key", ADMIN_KEY, "--admin-root", str(setup["root"]),
    ]  # fmt: skip
    with running_server(cmd, env, log, port, START_TIMEOUT_S) as url:
        server = {"url": url, "log": log}
        with pytest.raises(urllib.error.HTTPError) as err:
            _load(server, "lora-qvdown", setup["served"] / "lora-qvdown")
        assert err.value.code == 400 and "serves MoKA adapters only" in err.value.read().decode()
        jobs = [(n, setup["prompts"][p]) for p in range(3) for n in [None, *names]] * 2
        results = _complete_all(server, jobs, lambda n: n or str(setup["base"]))
    for (name, prompt), (tokens, _) in zip(jobs, results, strict=True):
        deltas = None if name is None else setup["deltas"][name]
        assert tokens == reference.generate(prompt, MAX_TOKENS, deltas)[0], name
    text = log.read_text()
    assert "no LoRA buffers (MoKA-only" in text, text[-3000:]


def test_tp2_mixed_requests_match_the_reference(server, setup, reference):
    jobs = [(n, setup["prompts"][p]) for n, p in JOBS] * 2  # twice: evicted and reloaded
    results = _complete_all(server, jobs, lambda n: n or str(setup["base"]))
    for (name, prompt), (tokens, lps) in zip(jobs, results, strict=True):
        deltas = None if name is None else setup["deltas"][name]
        ref_tokens, ref_lps = reference.generate(prompt, MAX_TOKENS, deltas)
        assert tokens == ref_tokens, (name, "reference")
        diff = max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True))
        assert diff < LOGPROB_TOL, (name, diff)
    first = {n: results[i][0] for i, (n, p) in enumerate(JOBS) if p == 0}
    assert len({tuple(t) for t in first.values()}) == len(first)  # every adapter matters


ADMIN_KEY = "tp-admin-key"


def _load(server, name, path):
    req = urllib.request.Request(
        server["url"] + "/v1/load_lora_adapter",
        data=json.dumps({"lora_name": name, "lora_path": str(path)}).encode(),
        headers={"Content-Type": "application/json", "X-Moka-Admin-Key": ADMIN_KEY},
    )
    return urllib.request.urlopen(req)


def test_bad_adapters_are_4xx_and_the_engine_keeps_serving(server, setup, reference):
    root = setup["root"]
    # Dims of another base (the default tiny Llama's 256-wide q_proj).
    other = random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=35)
    write_moka(root / "other-base", other)
    # Non-finite weights in the last layer only (written past the format's own save checks).
    nan = random_moka({"down_proj": [[16, 3, 12, 128]]}, seed=36, dims=DIMS, layers=4)
    weights = write_moka(root / "nan-moka", nan) / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    key = next(k for k in tensors if "layers.3." in k and "moka_B.0" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata=metadata)
    for name, folder, reason in (
        ("other-base", root / "other-base", "q_proj"),
        ("nan-moka", root / "nan-moka", "finite"),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            _load(server, name, folder)
        message = err.value.read().decode()
        assert 400 <= err.value.code < 500, message
        assert reason in message, message
    prompt = setup["prompts"][0]
    jobs = [(n, prompt) for n in [None, *NAMES]]
    results = _complete_all(server, jobs, lambda n: n or str(setup["base"]))
    for (name, _), (tokens, _) in zip(jobs, results, strict=True):
        deltas = None if name is None else setup["deltas"][name]
        assert tokens == reference.generate(prompt, MAX_TOKENS, deltas)[0], name
