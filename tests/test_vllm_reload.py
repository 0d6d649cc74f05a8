"""Adapters loaded again under the same name, with the real engine: prefix-cache blocks and
vLLM's ``load_inplace``.

CPU, float32, the tiny Llama, eager (no compilation to wait for: what is tested here is which
weights and which KV a request gets, not the compiled path), 32-token KV blocks (the CPU attention's smallest) so that a
70-token prompt fills two blocks the prefix cache keeps. Every output is compared with a
transformers reference with delta_W merged (tokens exactly, logprobs within 1e-4).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from vllm_helpers import (  # noqa: E402
    Reference,
    check_against_reference,
    lora_request,
    mixed_adapters,
    run,
    run_with_a_change_midway,
    tiny_engine,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-reload")


@pytest.fixture(scope="module")
def base_dir(workdir) -> Path:
    from moka_core.base_models import build_tiny_llama

    return build_tiny_llama(workdir / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def adapters(workdir) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    return mixed_adapters(workdir)


@pytest.fixture(scope="module")
def llm(base_dir):
    with tiny_engine(base_dir, {"block_size": 32, "enforce_eager": True}) as engine:
        assert engine.llm_engine.vllm_config.cache_config.enable_prefix_caching
        yield engine


@pytest.fixture(scope="module")
def reference(base_dir) -> Reference:
    return Reference(base_dir)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    """70 tokens: two full 32-token blocks for the prefix cache."""
    return [(37 * i + 11) % 900 + 10 for i in range(70)]


def _copy(src: Path, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(src, folder)


def test_a_folder_loaded_again_with_other_weights_reuses_no_old_kv(
    llm, reference, adapters, prompt, workdir
):
    """Served, unloaded, re-saved with other weights and loaded again under the same name and
    path (a new id, as ``/v1/load_lora_adapter`` gives): the prompt's cached blocks were
    computed with the old weights and must not be reused. vLLM 0.32 keys them by name and path
    only, and served the new weights over the old KV (``same_name_fix``)."""
    folder = workdir / "resaved"
    _copy(adapters["moka-qkv"][0], folder)
    first = lora_request("resaved-1", folder, served_as="resaved")
    check_against_reference(
        reference, prompt, adapters["moka-qkv"][1], run(llm, [prompt], [first])[0]
    )
    assert llm.llm_engine.remove_lora(first.lora_int_id)
    _copy(adapters["mokas-o-down"][0], folder)
    second = lora_request("resaved-2", folder, served_as="resaved")
    out = run(llm, [prompt], [second])[0]
    check_against_reference(reference, prompt, adapters["mokas-o-down"][1], out)
    # The same adapter again: its own blocks are reused, and still exact.
    check_against_reference(
        reference, prompt, adapters["mokas-o-down"][1], run(llm, [prompt], [second])[0]
    )


def test_requests_after_an_in_place_load_are_not_loaded_again_in_every_step(
    llm, reference, adapters, prompt, workdir
):
    """vLLM's ``load_inplace`` stays on the request, and vLLM loaded such an adapter again from
    its folder in every step: a folder deleted meanwhile killed the engine. The in-place load
    reads the folder; the steps use what it loaded."""
    folder = workdir / "in-place"
    _copy(adapters["moka-qkv"][0], folder)
    req = lora_request("in-place", folder, load_inplace=True)
    assert llm.llm_engine.add_lora(req)
    out = run_with_a_change_midway(llm, prompt, req, lambda: shutil.rmtree(folder))
    check_against_reference(reference, prompt, adapters["moka-qkv"][1], out)
