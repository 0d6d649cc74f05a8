"""Random MoKA and LoRA adapters for any Llama-shaped base: benchmarks and tests write these.

Random (not trained) adapters cost exactly what trained ones cost to serve: the kernels never
look at the values. Weights are drawn from a seeded generator so a benchmark's adapters are the
same on every machine. Layer sizes come from the base's ``config.json`` (``moka_core.base_models.llama_dims``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moka_core.adapter_format import MokaAdapter, MokaConfig, MokaModuleWeights, save_adapter

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
    """The Hugging Face module path of ``target`` in decoder layer ``layer``."""
    return f"model.layers.{layer}.{MODULE_PARENT[target]}.{target}"


def random_moka(
    components: dict[str, list[list[int]]],
    *,
    seed: int,
    dims: dict[str, tuple[int, int]],
    layers: int,
    variant: str = "moka",
    gating: bool = True,
    scaling: float = 1.0,
    std: float = 0.35,
    base_model: str = "tiny-llama",
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
            "base_model_name_or_path": base_model,
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


def write_random_lora(
    folder: Path,
    targets: list[str],
    *,
    seed: int,
    dims: dict[str, tuple[int, int]],
    layers: int,
    r: int = 8,
    alpha: float = 16.0,
    std: float = 0.1,
    base_model: str = "tiny-llama",
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
        "base_model_name_or_path": base_model,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return deltas
