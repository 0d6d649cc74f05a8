"""A LoRA resolver for a folder of adapters: MoKA and LoRA sub-folders, found by name.

vLLM's built-in filesystem resolver accepts only ``peft_type == "LORA"``. This one serves any
sub-folder of ``MOKA_ADAPTER_DIR`` whose ``adapter_config.json`` says MOKA or LORA, so adapters
copied into the folder after start-up are found on their first request. Validation is left to
the loader (which turns a bad adapter into a clean error).
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from .lora_model import SUPPORTED_PEFT_TYPES, read_peft_type

RESOLVER_NAME = "moka_dir"
ENV_DIR = "MOKA_ADAPTER_DIR"


class MokaDirResolver(LoRAResolver):
    """Resolve ``name`` to ``<root>/<name>`` when that folder holds a MoKA or LoRA adapter."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not lora_name or "/" in lora_name or lora_name.startswith("."):
            return None  # names are single folder names; no path traversal
        folder = self.root / lora_name
        if not folder.is_dir():
            return None
        try:
            peft_type = read_peft_type(folder)
        except ValueError:
            peft_type = "MOKA"  # let the loader report the broken config by name
        if peft_type not in SUPPORTED_PEFT_TYPES:
            return None
        # The id is replaced by the server (OpenAIServingModels.resolve_lora).
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))


def install() -> None:
    """Register the resolver when ``MOKA_ADAPTER_DIR`` names a folder."""
    root = os.environ.get(ENV_DIR, "").strip()
    if root and os.path.isdir(root):
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, MokaDirResolver(root))
