"""Helpers shared by the vLLM engine and HTTP tests: random adapters and a transformers reference.

The reference applies each adapter's dense delta_W to a transformers copy of the base and runs
greedy decoding in float32, so vLLM's output can be compared token for token and logprob for
logprob.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from moka_serve.adapter_format import MokaAdapter
from moka_serve.bench.random_adapters import module_path, write_moka  # noqa: F401 (re-exported)
from moka_serve.bench.random_adapters import random_moka as _random_moka
from moka_serve.bench.random_adapters import write_random_lora as _write_random_lora
from moka_serve.bench.server import ServerError, free_port  # noqa: F401 (re-exported)
from moka_serve.bench.server import running_server as _running_server

# The tiny Llama of moka_trainer.models.build_tiny_llama: hidden 256, 4 layers, 4 heads / 2 KV
# heads (head_dim 64, so k/v are 128 wide), intermediate 512.
TINY_DIMS = {
    "q_proj": (256, 256),
    "k_proj": (128, 256),
    "v_proj": (128, 256),
    "o_proj": (256, 256),
    "gate_proj": (512, 256),
    "up_proj": (512, 256),
    "down_proj": (256, 512),
}
TINY_LAYERS = 4


def random_moka(components: dict[str, list[list[int]]], **kw) -> MokaAdapter:
    """``moka_serve.bench.random_adapters.random_moka`` over the tiny Llama by default."""
    kw.setdefault("dims", TINY_DIMS)
    kw.setdefault("layers", TINY_LAYERS)
    return _random_moka(components, **kw)


def write_random_lora(folder: Path, targets: list[str], **kw) -> dict[str, torch.Tensor]:
    """``moka_serve.bench.random_adapters.write_random_lora`` over the tiny Llama by default."""
    kw.setdefault("dims", TINY_DIMS)
    kw.setdefault("layers", TINY_LAYERS)
    return _write_random_lora(folder, targets, **kw)


def moka_deltas(adapter: MokaAdapter) -> dict[str, torch.Tensor]:
    """HF module path -> dense float64 delta_W."""
    return {p: adapter.delta_weight(p) for p in adapter.modules}


class Reference:
    """A transformers copy of the base; ``generate`` merges a delta set, decodes greedily."""

    def __init__(self, base_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.original = {k: v.clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], max_tokens: int, deltas: dict[str, torch.Tensor] | None
    ) -> tuple[list[int], list[float]]:
        """Greedy tokens and the log-probability of each chosen token."""
        self.model.load_state_dict(self.original)
        params = dict(self.model.named_parameters())
        for path, delta in (deltas or {}).items():
            w = params[f"{path}.weight"]
            w.copy_((w.double() + delta).to(w.dtype))
        ids = list(prompt_ids)
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logits = self.model(torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, dim=-1)
            t = int(torch.argmax(lp))
            tokens.append(t)
            logprobs.append(float(lp[t]))
            ids.append(t)
        return tokens, logprobs


@contextmanager
def running_server(
    cmd: list[str], env: dict, log: Path, port: int, timeout_s: float
) -> Iterator[str]:
    """``moka_serve.bench.server.running_server``, failing the test (with the log) if it dies."""
    try:
        with _running_server(cmd, env, log, port, timeout_s) as url:
            yield url
    except ServerError as e:
        pytest.fail(str(e))
