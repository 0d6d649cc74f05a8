"""vLLM's deployment filter ``--lora-target-modules`` with the MoKA plugin, on the real engine.

With the filter, vLLM wraps only the listed layers, so the others run no adapter op at all (what
``moka-bench compare`` measures against the plain engine: the adapters ``moka-train`` makes
target q_proj and v_proj). Adapters on those layers are served exactly; an adapter with a module
outside the filter is refused with an error naming the option. vLLM alone would drop that
module's LoRA weights and serve the rest: another model than the one trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from vllm_helpers import (  # noqa: E402
    Reference,
    check_against_reference,
    lora_request,
    moka_deltas,
    random_moka,
    run,
    tiny_engine,
    tiny_prompts,
    write_moka,
    write_random_lora,
)

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-target-modules")


@pytest.fixture(scope="module")
def base_dir(workdir) -> Path:
    from moka_core.base_models import build_tiny_llama

    return build_tiny_llama(workdir / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def llm(base_dir):
    with tiny_engine(base_dir, {"lora_target_modules": TARGETS}) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(base_dir) -> Reference:
    return Reference(base_dir)


@pytest.fixture(scope="module")
def prompts(base_dir) -> list[list[int]]:
    return tiny_prompts(base_dir)


@pytest.fixture(scope="module")
def adapters(workdir) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """A q/v MoKA adapter in moka-train's mixed form (a balanced term and rank-1 terms) and a
    q/v LoRA: what the filter admits."""
    moka = random_moka(
        {"q_proj": [[16, 16, 16, 16]] + [[256, 1, 1, 256]] * 3, "v_proj": [[8, 16, 16, 16]]},
        seed=21,
    )
    lora_dir = workdir / "lora-qv"
    return {
        "moka-qv": (write_moka(workdir / "moka-qv", moka), moka_deltas(moka)),
        "lora-qv": (lora_dir, write_random_lora(lora_dir, TARGETS, seed=22)),
    }


def _adapted_modules(worker) -> list[str]:
    manager = worker.model_runner.lora_manager._adapter_manager
    return sorted({name.rsplit(".", 1)[-1] for name in manager.modules})


def test_only_the_listed_layers_are_adapted(llm):
    (names,) = llm.collective_rpc(_adapted_modules)
    assert names == ["qkv_proj"]


def test_admitted_adapters_are_served_exactly_beside_base(llm, reference, adapters, prompts):
    names = [None, "moka-qv", "lora-qv", "moka-qv", None]
    batch_prompts = [prompts[i % len(prompts)] for i in range(len(names))]
    reqs = [None if n is None else lora_request(n, adapters[n][0]) for n in names]
    outs = run(llm, batch_prompts, reqs)
    for name, prompt, got in zip(names, batch_prompts, outs, strict=True):
        check_against_reference(reference, prompt, None if name is None else adapters[name][1], got)
    base = run(llm, [prompts[0]], [None])[0][0]
    for name in adapters:
        assert run(llm, [prompts[0]], [lora_request(name, adapters[name][0])])[0][0] != base


def _outside(workdir: Path, kind: str) -> Path:
    folder = workdir / f"outside-{kind}"
    if kind == "moka":
        adapter = random_moka({"q_proj": [[16, 16, 16, 16]], "o_proj": [[16, 16, 16, 16]]}, seed=23)
        write_moka(folder, adapter)
    else:
        write_random_lora(folder, ["q_proj", "v_proj", "down_proj"], seed=24)
    return folder


@pytest.mark.parametrize("kind, module", [("moka", "o_proj"), ("lora", "down_proj")])
def test_adapter_outside_the_filter_is_refused_and_engine_keeps_serving(
    llm, reference, adapters, prompts, workdir, kind, module
):
    folder = _outside(workdir, kind)
    with pytest.raises(Exception) as err:
        llm.llm_engine.add_lora(lora_request(f"outside-{kind}", folder))
    message = str(err.value)
    assert "--lora-target-modules q_proj v_proj" in message, message
    assert f"{module}'" in message, message
    outs = run(
        llm, [prompts[1], prompts[2]], [lora_request("moka-qv", adapters["moka-qv"][0]), None]
    )
    check_against_reference(reference, prompts[1], adapters["moka-qv"][1], outs[0])
    check_against_reference(reference, prompts[2], None, outs[1])
