"""A LoRA resolver for a folder of adapters: MoKA and LoRA sub-folders, found by name.

vLLM's built-in filesystem resolver accepts only ``peft_type == "LORA"``. This one serves any
sub-folder of ``MOKA_ADAPTER_DIR`` that holds an ``adapter_config.json``, so adapters copied into
the folder after start-up are found on their first request. Validation is left to the loader,
which turns a bad adapter (an unsupported ``peft_type`` included) into a 400 with its reason.

The resolver stays inside the folder: a name is one path component (no separators, no leading
dot, at most 255 bytes), and a symlink whose target lies outside the folder is not followed
(``MOKA_ALLOW_SYMLINKS=1`` allows it). Names that cannot be adapters are simply not found (404).
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from moka_core.adapter_dir import adapter_folder

RESOLVER_NAME = "moka_dir"
ENV_DIR = "MOKA_ADAPTER_DIR"


class MokaDirResolver(LoRAResolver):
    """Resolve ``name`` to ``<root>/<name>`` when that folder holds an adapter config."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        folder = adapter_folder(self.root, lora_name)
        if folder is None:
            return None
        # The id is replaced by the server (OpenAIServingModels.resolve_lora).
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))


def install() -> None:
    """Register the resolver when ``MOKA_ADAPTER_DIR`` names a folder."""
    from moka_core import settings

    root = settings.get(ENV_DIR)
    if root and os.path.isdir(root):
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, MokaDirResolver(root))
