"""The mixed-batch exactness test with compilation off (``MOKA_COMPILE=0``, the documented
opt-out): the adapter engine then runs eager, as vLLM's CPU platform would without the plugin,
and serves the same tokens (``test_vllm_plugin.py`` runs the same batch compiled)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from vllm_helpers import (  # noqa: E402
    Reference,
    check_mixed_batch,
    mixed_adapters,
    tiny_engine,
    tiny_prompts,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moka_serve.base_models import build_tiny_llama

    workdir: Path = tmp_path_factory.mktemp("vllm-eager")
    base = build_tiny_llama(workdir / "tiny-llama", seed=0)
    with tiny_engine(base, MOKA_COMPILE="0") as llm:
        yield llm, base, workdir


def test_opt_out_keeps_the_engine_eager(setup):
    from vllm.config import CompilationMode

    llm, _, _ = setup
    assert llm.llm_engine.vllm_config.compilation_config.mode == CompilationMode.NONE


def test_mixed_batch_matches_reference_eager(setup):
    llm, base, workdir = setup
    check_mixed_batch(llm, Reference(base), mixed_adapters(workdir), tiny_prompts(base))
