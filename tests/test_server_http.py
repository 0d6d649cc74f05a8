"""``moka-serve`` end to end over HTTP with the ``openai`` client (CPU, float32, tiny Llama).

One server for the module, started through ``python -m moka_serve.cli`` (compiled: the plugin keeps
torch.compile on with adapters). Static (``--adapters``)
MoKA and LoRA adapters, one loaded at run time through ``/v1/load_lora_adapter`` and one copied
into the adapters folder after start-up (found by the plugin's resolver) are requested
concurrently, streaming and not, and each answer must equal the transformers reference.

The server has an admin key and one extra root (``extra``): loading and unloading need the key,
and a path outside the adapters folder and that root is refused whoever asks (issue #22).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_helpers import (  # noqa: E402
    Reference,
    free_port,
    moka_deltas,
    random_moka,
    running_server,
    write_moka,
    write_random_lora,
)

pytestmark = pytest.mark.slow

ADMIN_KEY = "test-admin-key"

MAX_TOKENS = 6
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moka_core.base_models import build_tiny_llama

    root = tmp_path_factory.mktemp("http")
    base = build_tiny_llama(root / "tiny-llama", seed=0)
    served = root / "adapters"
    served.mkdir()
    extra = root / "extra"
    deltas = {}
    a = random_moka({"q_proj": [[16, 16, 16, 16]], "v_proj": [[8, 16, 16, 16]]}, seed=21)
    write_moka(served / "moka-qv", a)
    deltas["moka-qv"] = moka_deltas(a)
    b = random_moka({"o_proj": [[16, 16, 16, 16]]}, seed=22, variant="mokas")
    write_moka(served / "mokas-o", b)
    deltas["mokas-o"] = moka_deltas(b)
    deltas["lora-qv"] = write_random_lora(served / "lora-qv", ["q_proj", "v_proj"], seed=23)
    c = random_moka({"gate_proj": [[32, 16, 16, 16]], "up_proj": [[16, 16, 32, 16]]}, seed=24)
    write_moka(extra / "moka-dynamic", c)
    deltas["moka-dynamic"] = moka_deltas(c)
    d = random_moka({"down_proj": [[16, 32, 16, 16]]}, seed=25)
    write_moka(extra / "moka-resolved", d)
    deltas["moka-resolved"] = moka_deltas(d)
    # Written for another base (320-wide q_proj): left out at start-up (it used to abort it).
    other = {"q_proj": (320, 320)}
    write_moka(served / "moka-other-base", random_moka({"q_proj": [[16, 20, 20, 16]]}, seed=26,
                                                       dims=other))  # fmt: skip
    return {"root": root, "base": base, "served": served, "extra": extra, "deltas": deltas}


@pytest.fixture(scope="module")
def server(setup):
    port = free_port()
    log = setup["root"] / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [
        sys.executable,
        "-m",
        "moka_serve.cli",
        "--base",
        str(setup["base"]),
        "--adapters",
        str(setup["served"]),
        "--quantize",
        "none",
        "--dtype",
        "float32",
        "--max-model-len",
        "128",
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "8",
        "--max-lora-rank",
        "16",
        "--max-num-seqs",
        "16",
        "--seed",
        "0",
        "--admin-key",
        ADMIN_KEY,
        "--admin-root",
        str(setup["extra"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running_server(cmd, env, log, port, START_TIMEOUT_S) as url:
        yield {"url": url, "log": log}


@pytest.fixture(scope="module")
def reference(setup) -> Reference:
    return Reference(setup["base"])


@pytest.fixture(scope="module")
def prompts(setup) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(setup["base"]))
    texts = ["The quick brown fox", "Once upon a time", "12 + 7 = 19, and 3 * 4 =", "hello"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _admin_post(server, path: str, body: dict, key: str | None = ADMIN_KEY):
    """POST to an admin endpoint; the response, or the ``HTTPError`` (which reads like one)."""
    import json

    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-Moka-Admin-Key"] = key
    req = urllib.request.Request(
        server["url"] + path, data=json.dumps(body).encode(), headers=headers
    )
    try:
        return urllib.request.urlopen(req)
    except urllib.error.HTTPError as e:
        return e


def _model_ids(server) -> set[str]:
    import json

    with urllib.request.urlopen(server["url"] + "/v1/models") as r:
        return {m["id"] for m in json.load(r)["data"]}


def _client(server):
    return openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


async def _complete(client, model: str, prompt: list[int], stream: bool) -> list[int]:
    kwargs = dict(
        model=model,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    if not stream:
        r = await client.completions.create(**kwargs)
        return list(r.choices[0].model_extra["token_ids"])
    tokens: list[int] = []
    async for chunk in await client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            tokens.extend((choice.model_extra or {}).get("token_ids") or [])
    return tokens


def _expected(reference, setup, cache, name, prompt):
    key = (name, tuple(prompt))
    if key not in cache:
        deltas = None if name is None else setup["deltas"][name]
        cache[key] = reference.generate(prompt, MAX_TOKENS, deltas)[0]
    return cache[key]


_cache: dict = {}


def test_models_lists_static_adapters(server, setup):
    import json

    with urllib.request.urlopen(server["url"] + "/v1/models") as r:
        ids = {m["id"] for m in json.load(r)["data"]}
    assert {str(setup["base"]), "moka-qv", "mokas-o", "lora-qv"} <= ids
    assert "moka-other-base" not in ids
    log = server["log"].read_text()
    assert "not serving adapter 'moka-other-base'" in log


def test_concurrent_mixed_requests_match_reference(server, setup, reference, prompts):
    names = [None, "moka-qv", "mokas-o", "lora-qv"]
    jobs = [
        (names[i % 4], prompts[(i // 4) % len(prompts)], bool(i % 2)) for i in range(20)
    ]  # 20 requests in flight: every adapter, every prompt, streaming and not

    async def go():
        client = _client(server)
        try:
            return await asyncio.gather(
                *(_complete(client, n or str(setup["base"]), p, s) for n, p, s in jobs)
            )
        finally:
            await client.close()

    results = asyncio.run(go())
    for (name, prompt, stream), tokens in zip(jobs, results, strict=True):
        assert tokens == _expected(reference, setup, _cache, name, prompt), (name, stream)
    assert len({tuple(t) for t in results[:4]}) > 1  # adapters change the base output


def test_runtime_load_and_resolver(server, setup, reference, prompts):

    body = {"lora_name": "moka-dynamic", "lora_path": str(setup["extra"] / "moka-dynamic")}
    r = _admin_post(server, "/v1/load_lora_adapter", body)
    assert r.status == 200, r.read().decode()
    # Copied into the served folder after start-up: found by the resolver on first request.
    shutil.copytree(setup["extra"] / "moka-resolved", setup["served"] / "moka-resolved")

    async def go():
        client = _client(server)
        try:
            return await asyncio.gather(
                *(
                    _complete(client, n, p, s)
                    for n in ("moka-dynamic", "moka-resolved")
                    for p in prompts[:2]
                    for s in (False, True)
                )
            )
        finally:
            await client.close()

    results = asyncio.run(go())
    i = 0
    for n in ("moka-dynamic", "moka-resolved"):
        for p in prompts[:2]:
            for _ in (False, True):
                assert results[i] == _expected(reference, setup, _cache, n, p), n
                i += 1

    # Unloading forgets the name (it is not in the served folder, so no resolver finds it).
    r = _admin_post(server, "/v1/unload_lora_adapter", {"lora_name": "moka-dynamic"})
    assert r.status == 200, r.read().decode()

    async def after_unload():
        client = _client(server)
        try:
            with pytest.raises(openai.NotFoundError):
                await _complete(client, "moka-dynamic", prompts[0], False)
        finally:
            await client.close()

    asyncio.run(after_unload())


def test_bad_and_unknown_adapters_get_errors(server, setup, reference, prompts):
    import json

    bad = setup["extra"] / "bad-moka"
    shutil.copytree(setup["extra"] / "moka-resolved", bad)
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    body = {"lora_name": "bad-moka", "lora_path": str(bad)}
    r = _admin_post(server, "/v1/load_lora_adapter", body)
    assert r.status == 400
    message = r.read().decode()
    assert "Invalid adapter 'bad-moka'" in message and "truncated" in message, message
    # The same request for the same unchanged folder is answered without the engine.
    seen = server["log"].read_text().count("Invalid adapter 'bad-moka'")
    r = _admin_post(server, "/v1/load_lora_adapter", body)
    assert r.status == 400 and r.read().decode() == message
    assert server["log"].read_text().count("Invalid adapter 'bad-moka'") == seen
    # A broken folder in the served directory: the resolver finds it, the load fails with 400.
    served = setup["served"]
    shutil.copytree(bad, served / "bad-resolved")
    shutil.copytree(setup["extra"] / "moka-resolved", served / "lokr")
    cfg = json.loads((served / "lokr" / "adapter_config.json").read_text())
    (served / "lokr" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOKR"}))
    shutil.copytree(setup["extra"] / "moka-resolved", served / "nested")
    (served / "nested" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    # A symlink out of the served directory is not followed.
    (served / "link-out").symlink_to(setup["extra"] / "moka-resolved")

    async def go():
        client = _client(server)
        try:
            with pytest.raises(openai.NotFoundError):
                await _complete(client, "no-such-adapter", prompts[0], False)
            with pytest.raises(openai.NotFoundError):  # was 500: "File name too long"
                await _complete(client, "a" * 5000, prompts[0], False)
            with pytest.raises(openai.NotFoundError):
                await _complete(client, "link-out", prompts[0], False)
            answers = []
            for name, match, stream in (
                ("lokr", "unsupported peft_type 'LOKR'", False),  # was 404
                ("nested", "nested too deeply", False),  # was 500
                ("bad-resolved", "truncated", True),
                ("moka-other-base", "q_proj", False),
            ):
                with pytest.raises(openai.BadRequestError, match=match) as err:
                    await _complete(client, name, prompts[0], stream)
                answers.append(str(err.value))
            # An inference client's errors name the adapter, never a path on the server.
            assert not any(str(setup["root"]) in a for a in answers), answers
            # A retry of the same unchanged folder is answered without the engine.
            with pytest.raises(openai.BadRequestError, match="truncated"):
                await _complete(client, "bad-resolved", prompts[0], False)
            # The engine writes its log line on its own time: wait for it, then count.
            line = "Failed to load LoRA 'bad-resolved'"
            for _ in range(100):
                if line in server["log"].read_text():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            assert server["log"].read_text().count(line) == 1
            # Once the folder is fixed, the same name loads.
            shutil.rmtree(served / "bad-resolved")
            shutil.copytree(setup["extra"] / "moka-resolved", served / "bad-resolved")
            fixed = await _complete(client, "bad-resolved", prompts[1], False)
            want = _expected(reference, setup, _cache, "moka-resolved", prompts[1])
            assert fixed == want
            return await _complete(client, "moka-qv", prompts[0], False)
        finally:
            await client.close()

    assert asyncio.run(go()) == _expected(reference, setup, _cache, "moka-qv", prompts[0])


def test_adapter_inventory(server, setup):
    import json

    try:
        with urllib.request.urlopen(server["url"] + "/v1/moka/adapters") as r:
            raw = r.read().decode()
            items = {a["name"]: a for a in json.loads(raw)["data"]}
    except urllib.error.HTTPError as e:
        pytest.fail(f"{e.code}: {e.read().decode()}")
    # An inference client sees no server path: not the folders, not the base's cache folder.
    assert all("path" not in a for a in items.values())
    assert str(setup["root"]) not in raw and str(setup["base"]) not in raw, raw[:2000]
    with urllib.request.urlopen(server["url"] + "/v1/moka/adapters/moka-qv") as r:
        assert "path" not in json.load(r)
    # An admin client sees where each adapter is.
    req = urllib.request.Request(
        server["url"] + "/v1/moka/adapters", headers={"X-Moka-Admin-Key": ADMIN_KEY}
    )
    with urllib.request.urlopen(req) as r:
        admin_view = {a["name"]: a for a in json.load(r)["data"]}
    assert admin_view["moka-qv"]["path"] == str(setup["served"] / "moka-qv")
    qv = items["moka-qv"]
    assert qv["kind"] == "MOKA"
    assert qv["targets"]["q_proj"]["components"] == [[16, 16, 16, 16]]
    assert qv["targets"]["v_proj"]["out_features"] == 128
    assert qv["trainable_parameters"] > 0
    assert len(qv["gates"]["q_proj"]) == 1
    assert qv["location"] in ("disk", "cpu") or qv["location"].startswith("slot ")
    assert items["lora-qv"]["kind"] == "LORA" and items["lora-qv"]["rank"] == 8
    assert items["mokas-o"]["variant"] == "mokas"
    # Requested just now, so it sits in a device slot.
    assert any(a["location"].startswith("slot ") for a in items.values())
    with urllib.request.urlopen(server["url"] + "/v1/moka/adapters/lora-qv") as r:
        assert json.load(r)["name"] == "lora-qv"
    with urllib.request.urlopen(server["url"] + "/v1/moka/pools") as r:
        pools = json.load(r)
    assert pools["slots"] >= 1 and pools["slot_memory"]["lora_bytes"] > 0
    qkv = [v for k, v in pools["layers"].items() if k.endswith("qkv_proj")]
    assert len(qkv) == 4 and all(p["capacity_numel"] > 0 for p in qkv)
    assert all(p["admitted_adapters"] >= 1 for p in qkv)  # moka-qv is admitted in every layer
    # Folders of the served directory by the resolver's rule; broken ones listed with a reason.
    assert "link-out" not in items
    assert "nested too deeply" in items["nested"]["error"]
    assert items["lokr"]["kind"] == "LOKR" and "unsupported" in items["lokr"]["error"]
    # A folder rewritten on disk is described anew (the cache follows the files).
    changing = setup["served"] / "moka-changing"
    write_moka(changing, random_moka({"up_proj": [[16, 16, 32, 16]]}, seed=27))
    with urllib.request.urlopen(server["url"] + "/v1/moka/adapters/moka-changing") as r:
        assert json.load(r)["targets"]["up_proj"]["components"] == [[16, 16, 32, 16]]
    shutil.rmtree(changing)
    write_moka(changing, random_moka({"up_proj": [[8, 16, 64, 16], [32, 16, 16, 16]]}, seed=28))
    with urllib.request.urlopen(server["url"] + "/v1/moka/adapters/moka-changing") as r:
        got = json.load(r)
    assert got["targets"]["up_proj"]["components"] == [[8, 16, 64, 16], [32, 16, 16, 16]]
    assert got["trainable_parameters"] == 4 * (8 * 16 + 64 * 16 + 32 * 16 + 16 * 16 + 2)
    weights = changing / "adapter_model.safetensors"  # the weights alone change: caught too
    weights.write_bytes(weights.read_bytes()[:-8])
    with urllib.request.urlopen(server["url"] + "/v1/moka/adapters/moka-changing") as r:
        assert "truncated" in json.load(r)["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server["url"] + "/v1/moka/adapters/nope")
    assert err.value.code == 404


def test_admin_endpoints_need_the_admin_key_and_change_nothing_without_it(server, setup, prompts):
    before = _model_ids(server)
    body = {"lora_name": "moka-sneaky", "lora_path": str(setup["extra"] / "moka-dynamic")}
    for key in (None, "wrong-key", ADMIN_KEY + "x", ""):
        r = _admin_post(server, "/v1/load_lora_adapter", body, key=key)
        assert r.status == 401, (key, r.status)
        assert "X-Moka-Admin-Key" in r.read().decode()
        r = _admin_post(server, "/v1/unload_lora_adapter", {"lora_name": "moka-qv"}, key=key)
        assert r.status == 401, (key, r.status)
    # vLLM registers the same handlers as SageMaker's adapter routes: closed the same way.
    r = _admin_post(server, "/adapters", {"name": "moka-sneaky", "src": body["lora_path"]}, None)
    assert r.status == 401
    assert _model_ids(server) == before

    async def still_served():
        client = _client(server)
        try:
            return await _complete(client, "moka-qv", prompts[0], False)
        finally:
            await client.close()

    assert asyncio.run(still_served())  # the unload without the key did nothing


def test_admin_loads_only_from_the_allowed_roots(server, setup):
    before = _model_ids(server)
    outside = setup["root"] / "outside"  # beside the adapters folder, in neither root
    shutil.copytree(setup["extra"] / "moka-dynamic", outside / "moka-out")
    (setup["extra"] / "link-out").symlink_to(outside / "moka-out")  # a root's link pointing out
    for name, path in (
        ("moka-out", outside / "moka-out"),
        ("moka-link", setup["extra"] / "link-out"),
        ("moka-up", setup["extra"] / ".." / "outside" / "moka-out"),
        ("etc", "/etc"),
    ):
        r = _admin_post(
            server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}
        )
        message = r.read().decode()
        assert r.status == 403, (name, r.status, message)
        assert "outside the folders adapters may be loaded from" in message, message
    assert _model_ids(server) == before


def test_an_update_that_would_overflow_is_refused_at_load(server, setup, prompts):
    """Finite factors, ``scaling: 1e30``: the load-time bound refuses it with 400, by path and
    through the resolver alike, and the server goes on."""
    huge = random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=29, scaling=1e30)
    write_moka(setup["extra"] / "moka-huge", huge)
    r = _admin_post(
        server,
        "/v1/load_lora_adapter",
        {"lora_name": "moka-huge", "lora_path": str(setup["extra"] / "moka-huge")},
    )
    message = r.read().decode()
    assert r.status == 400 and "check the adapter's scaling" in message, message
    write_moka(setup["served"] / "moka-huge-resolved", huge)

    async def go():
        client = _client(server)
        try:
            with pytest.raises(openai.BadRequestError, match="check the adapter's scaling"):
                await _complete(client, "moka-huge-resolved", prompts[0], False)
            return await _complete(client, "moka-qv", prompts[0], False)
        finally:
            await client.close()

    assert asyncio.run(go())
