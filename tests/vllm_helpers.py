"""Helpers shared by the vLLM engine and HTTP tests: random adapters and a transformers reference.

The reference applies each adapter's dense delta_W to a transformers copy of the base and runs
greedy decoding in float32, so vLLM's output can be compared token for token and logprob for
logprob.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moka_serve.adapter_format import MokaAdapter, MokaConfig, MokaModuleWeights, save_adapter

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
MODULE_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def module_path(layer: int, target: str) -> str:
    return f"model.layers.{layer}.{MODULE_PARENT[target]}.{target}"


def random_moka(
    components: dict[str, list[list[int]]],
    *,
    seed: int,
    variant: str = "moka",
    gating: bool = True,
    scaling: float = 1.0,
    std: float = 0.35,
    dims: dict[str, tuple[int, int]] = TINY_DIMS,
    layers: int = TINY_LAYERS,
) -> MokaAdapter:
    """A random MoKA adapter over every layer for the given targets and component shapes."""
    g = torch.Generator().manual_seed(seed)
    targets = {
        t: {"in_features": dims[t][1], "out_features": dims[t][0], "components": comps}
        for t, comps in components.items()
    }
    cfg = MokaConfig.from_dict(
        {
            "peft_type": "MOKA",
            "moka_format_version": 1,
            "base_model_name_or_path": "tiny-llama",
            "target_modules": list(components),
            "targets": targets,
            "gating": gating,
            "scaling": scaling,
            "variant": variant,
        }
    )
    modules = {}
    for layer in range(layers):
        for t, comps in components.items():
            a_list, b_list = [], []
            for m1, n1, m2, n2 in comps:
                a_list.append(
                    None if variant == "mokas" else torch.randn(m1, n1, generator=g) * std
                )
                b_list.append(torch.randn(m2, n2, generator=g) * std)
            gate = torch.randn(len(comps), generator=g) if gating else None
            modules[module_path(layer, t)] = MokaModuleWeights(A=a_list, B=b_list, gate=gate)
    return MokaAdapter(cfg, modules)


def write_moka(folder: Path, adapter: MokaAdapter) -> Path:
    save_adapter(adapter, folder)
    return folder


def moka_deltas(adapter: MokaAdapter) -> dict[str, torch.Tensor]:
    """HF module path -> dense float64 delta_W."""
    return {p: adapter.delta_weight(p) for p in adapter.modules}


def write_random_lora(
    folder: Path,
    targets: list[str],
    *,
    seed: int,
    r: int = 8,
    alpha: float = 16.0,
    std: float = 0.1,
    dims: dict[str, tuple[int, int]] = TINY_DIMS,
    layers: int = TINY_LAYERS,
) -> dict[str, torch.Tensor]:
    """Write a PEFT LoRA folder; return its dense deltas (HF module path -> delta_W)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, deltas = {}, {}
    for layer in range(layers):
        for t in targets:
            out_f, in_f = dims[t]
            a = torch.randn(r, in_f, generator=g) * std
            b = torch.randn(out_f, r, generator=g) * std
            p = module_path(layer, t)
            tensors[f"base_model.model.{p}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{p}.lora_B.weight"] = b.contiguous()
            deltas[p] = (alpha / r) * (b.double() @ a.double())
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return deltas


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    cmd: list[str], env: dict, log: Path, port: int, timeout_s: float
) -> Iterator[str]:
    """Start an OpenAI server subprocess, wait for ``/health``, yield its URL, then stop it.

    A server that exits or does not become healthy in time fails the test with its log's tail.
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not start:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
