"""The plugin over a 4-bit (in-flight NF4, ``vllm-bnb-plugin``) base: MoKA, LoRA and base requests
in one batch on the quantized tiny Llama. MoKA adds its delta after the quantized base GEMM
(``quant_method.apply``), so the bank runs in the model dtype, bfloat16 here.

The engine compiles (the plugin keeps torch.compile on; bitsandbytes' 4-bit matmul traces).
Exactness against a reference is checked in float32 (``test_vllm_plugin.py``): vllm-bnb-plugin
cannot load a float32 4-bit model, and in bfloat16 vLLM's greedy tokens and a transformers NF4
reference part after the first token even for base requests (different bf16 kernels on a random
tiny model with flat logits), so here the check is that the quantized engine serves all three
kinds together, deterministically, and that each adapter changes the output.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("bitsandbytes")
pytest.importorskip("vllm_bnb_plugin")

from vllm_helpers import (  # noqa: E402
    collect_dead_engines,
    random_moka,
    write_moka,
    write_random_lora,
)

pytestmark = pytest.mark.slow


def test_4bit_base_serves_moka_lora_and_base_in_one_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # Engine core in its own process: another module's in-process engine may have run (and torn
    # down vLLM's process groups) in this pytest process.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from moka_core.base_models import build_tiny_llama

    base = build_tiny_llama(tmp_path / "tiny", seed=0)
    moka = random_moka(
        {
            "q_proj": [[16, 16, 16, 16]],
            "o_proj": [[16, 16, 16, 16]],
            "gate_proj": [[32, 16, 16, 16]],
        },
        seed=1,
    )
    write_moka(tmp_path / "moka", moka)
    write_random_lora(tmp_path / "lora", ["q_proj", "v_proj"], seed=2)
    collect_dead_engines()
    llm = LLM(
        model=str(base),
        enable_lora=True,
        max_loras=2,
        max_lora_rank=16,
        dtype="bfloat16",
        quantization="bitsandbytes",
        max_model_len=128,
        max_num_seqs=4,
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = TokensPrompt(prompt_token_ids=[478, 71, 569, 777, 500])
    reqs = [
        None,
        LoRARequest("moka", 1, str(tmp_path / "moka")),
        LoRARequest("lora", 2, str(tmp_path / "lora")),
    ]

    def run(requests):
        outs = llm.generate([prompt] * len(requests), params, lora_request=requests, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    mixed = run(reqs)
    assert mixed[0] != mixed[1] and mixed[0] != mixed[2]
    # Each alone gives the same tokens as inside the mixed batch.
    assert [run([r])[0] for r in reqs] == mixed
