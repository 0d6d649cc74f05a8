"""Model manager and worker-loader patches: MoKA adapters in vLLM's slots and caches.

* :class:`MokaLRUCacheLoRAModelManager` registers MoKA adapters without vLLM's LoRA merging
  (``_create_merged_loras_inplace`` assumes at least one LoRA weight) and writes the MoKA banks of
  the chosen slot after vLLM has set or reset the LoRA buffers of every layer.
* :func:`load_adapter_with_moka` replaces ``LRUCacheWorkerLoRAManager._load_adapter``: it reads
  ``adapter_config.json``'s ``peft_type`` before vLLM's ``PEFTHelper`` and routes MOKA to
  :func:`~moka_serve.plugin.loader.load_moka_model`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vllm.exceptions import LoRAAdapterNotFoundError
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.utils import get_adapter_absolute_path

from .layers import MokaLayerMixin
from .loader import MokaLoRAModel, check_peft_type, load_moka_model, read_peft_type

_ORIGINAL_LOAD_ADAPTER: Callable | None = None


class MokaLRUCacheLoRAModelManager(LRUCacheLoRAModelManager):
    """vLLM's LRU manager, plus MoKA adapters (which carry no LoRA weights)."""

    def __init__(self, *args, **kwargs) -> None:
        vllm_config = kwargs.get("vllm_config")
        if vllm_config is not None:
            tp = vllm_config.parallel_config.tensor_parallel_size
            if tp > 1:
                raise RuntimeError(
                    "moka-serve: tensor parallelism is not supported for MoKA adapters "
                    f"(tensor_parallel_size={tp}); run with tensor_parallel_size=1"
                )
        from vllm import envs

        if envs.VLLM_LORA_ENABLE_DUAL_STREAM:
            raise RuntimeError(
                "moka-serve: VLLM_LORA_ENABLE_DUAL_STREAM is not supported with MoKA adapters "
                "(that path bypasses _apply_lora_to_output); unset it"
            )
        lora_config = kwargs.get("lora_config")
        if lora_config is not None and lora_config.fully_sharded_loras:
            raise RuntimeError("moka-serve: fully_sharded_loras is not supported with MoKA")
        super().__init__(*args, **kwargs)

    def moka_layers(self) -> dict[str, MokaLayerMixin]:
        return {n: m for n, m in self.modules.items() if isinstance(m, MokaLayerMixin)}

    def _add_adapter(self, lora) -> None:
        if isinstance(lora, MokaLoRAModel):
            self._registered_adapters[lora.id] = lora
            return
        super()._add_adapter(lora)

    def activate_adapter(self, lora_id: int) -> bool:
        activated = super().activate_adapter(lora_id)
        if not activated:
            return activated
        index = self.lora_index_to_id.index(lora_id)
        adapter = self._registered_adapters[lora_id]
        entries = adapter.moka_entries if isinstance(adapter, MokaLoRAModel) else {}
        for name, module in self.moka_layers().items():
            layer_entries = entries.get(name)
            if layer_entries:
                module.set_moka(index, layer_entries)
            else:
                module.reset_moka(index)
        return activated

    def slot_of(self, lora_id: int) -> int | None:
        """Device slot holding ``lora_id`` now, or None (for the inventory)."""
        try:
            return self.lora_index_to_id.index(lora_id)
        except ValueError:
            return None


# Marks validation errors in messages that cross the engine-core process boundary as text, so
# the API server can answer them with 400 instead of vLLM's 500 (see ``api.py``).
INVALID_ADAPTER = "Invalid adapter"


def load_adapter_with_moka(self, lora_request):
    """``LRUCacheWorkerLoRAManager._load_adapter`` with MoKA dispatch (``self`` is the worker
    manager). Validation errors are re-raised as ``ValueError("Invalid adapter ...")``."""
    try:
        return _load(self, lora_request)
    except LoRAAdapterNotFoundError:
        raise
    except (ValueError, KeyError) as e:
        raise ValueError(f"{INVALID_ADAPTER} {lora_request.lora_name!r}: {e}") from None


def _load(self, lora_request):
    assert _ORIGINAL_LOAD_ADAPTER is not None
    path = get_adapter_absolute_path(lora_request.lora_path)
    peft_type = read_peft_type(path) if _is_dir(path) else None
    if peft_type is None:
        if not _is_dir(path):
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
        return _ORIGINAL_LOAD_ADAPTER(self, lora_request)
    check_peft_type(peft_type, path)
    if peft_type != "MOKA":
        return _ORIGINAL_LOAD_ADAPTER(self, lora_request)
    return load_moka_model(self._adapter_manager, lora_request, path)


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


def install() -> None:
    """Point vLLM's LRU worker manager at the MoKA manager and loader (idempotent)."""
    global _ORIGINAL_LOAD_ADAPTER
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    if LRUCacheWorkerLoRAManager._load_adapter is load_adapter_with_moka:
        return
    _ORIGINAL_LOAD_ADAPTER = LRUCacheWorkerLoRAManager._load_adapter
    LRUCacheWorkerLoRAManager._manager_cls = MokaLRUCacheLoRAModelManager
    LRUCacheWorkerLoRAManager._load_adapter = load_adapter_with_moka
