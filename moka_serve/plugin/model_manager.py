"""Model manager: MoKA adapters in vLLM's slots, and the per-step kernel metadata.

:class:`MokaLRUCacheLoRAModelManager` (installed as ``LRUCacheWorkerLoRAManager._manager_cls``)
registers MoKA adapters without vLLM's LoRA merging (``_create_merged_loras_inplace`` assumes at
least one LoRA weight), writes the MoKA banks of the chosen slot after vLLM has set or reset the
LoRA buffers of every layer, registers every adapter layer in the forward context under its own name
(for the custom op), and builds the step's :class:`MokaKernelMeta` once per step.
"""

from __future__ import annotations

from vllm.lora.model_manager import LRUCacheLoRAModelManager

from .kernel_metadata import MokaKernelMeta
from .layers import (
    AdapterLayerMixin,
    MokaLayerMixin,
    MokaLogitsProcessorWithLoRA,
    lora_buffers,
)
from .lora_model import MokaLoRAModel


class MokaLRUCacheLoRAModelManager(LRUCacheLoRAModelManager):
    """vLLM's LRU manager, plus MoKA adapters (which carry no LoRA weights)."""

    def __init__(self, *args, **kwargs) -> None:
        vllm_config = kwargs.get("vllm_config")
        if vllm_config is None:
            raise RuntimeError("moka-serve: the LoRA model manager was built without vllm_config")
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
        self._moka_metas: dict[int, tuple[object, MokaKernelMeta]] = {}
        forward_context = vllm_config.compilation_config.static_forward_context
        adapter_layers = {n: m for n, m in self.modules.items() if isinstance(m, AdapterLayerMixin)}
        # MOKA_ONLY, as the layers read it when they were built: the loader refuses LoRAs.
        self.moka_only = any(m.moka_only for m in adapter_layers.values())
        for name, module in adapter_layers.items():
            wrapper = module.punica_wrapper
            if id(wrapper) not in self._moka_metas:
                meta = MokaKernelMeta(
                    wrapper._token_lora_indices.shape[0], self.lora_slots, self.device
                )
                self._moka_metas[id(wrapper)] = (wrapper, meta)
            module.moka_meta = self._moka_metas[id(wrapper)][1]
            if isinstance(module, MokaLogitsProcessorWithLoRA):
                continue  # runs outside the compiled model: no op
            layer_name = f"{name}.moka_adapters"
            if layer_name in forward_context:
                raise RuntimeError(f"moka-serve: duplicate layer name {layer_name!r}")
            forward_context[layer_name] = module
            module.moka_layer_name = layer_name
        _log_slot_memory(self)
        if self.device.type == "cpu":
            _load_cpu_kernel()

    def moka_layers(self) -> dict[str, MokaLayerMixin]:
        return {n: m for n, m in self.modules.items() if isinstance(m, MokaLayerMixin)}

    def release_moka(self, adapter_id: int) -> None:
        """An adapter was unloaded: its room in every layer's pool is free for others."""
        for module in self.moka_layers().values():
            module.moka_bank.release(adapter_id)

    def _set_adapter_mapping(self, mapping) -> None:
        super()._set_adapter_mapping(mapping)
        for wrapper, meta in self._moka_metas.values():
            meta.update(wrapper.token_lora_indices)

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
        images = adapter.moka_images if isinstance(adapter, MokaLoRAModel) else {}
        for name, module in self.moka_layers().items():
            image = images.get(name)
            if image is not None and image.shapes:
                module.set_moka(index, image)
            else:
                module.reset_moka(index)
        return activated


def slot_memory(manager) -> dict[str, int]:
    """Bytes per adapter slot on this rank: vLLM's LoRA buffers (``lora_bytes``: the memory
    behind them, so MoKA-only engines' zero views count one element each), the MoKA pools as
    preallocated (``moka_pool_bytes``) and their capacity (``moka_capacity_bytes``, equal on
    GPU; on CPU nothing is preallocated, storage grows with the adapters held), and the slot
    tables (``moka_table_bytes``)."""
    import torch

    pool = capacity = table = 0
    storages: dict[int, int] = {}  # data_ptr -> bytes: views of one buffer count once
    slots = max(manager.lora_slots, 1)
    for module in manager.modules.values():
        if not isinstance(module, AdapterLayerMixin):
            continue
        for t in lora_buffers(module):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        bank = getattr(module, "moka_bank", None)
        if bank is not None:
            elt = torch.empty((), dtype=bank.dtype).element_size()
            table += bank.table.numel() * bank.table.element_size()
            capacity += bank.pool_numel * elt
            if bank.pool is not None:
                pool += bank.pool_numel * elt
    return {
        "lora_bytes": sum(storages.values()) // slots,
        "moka_pool_bytes": pool // slots,
        "moka_capacity_bytes": capacity // slots,
        "moka_table_bytes": table // slots,
    }


def _load_cpu_kernel() -> None:
    """Build (first time on this machine) and load the C++ kernel the CPU path uses for small
    batches (``moka_kernels.cpu_kernel``), unless ``MOKA_CPU_KERNEL=0``; without it, or when it
    cannot be built, the torch path serves every batch, and the log says why."""
    from vllm.logger import init_logger

    from moka_core import settings
    from moka_core.base_models import cache_dir
    from moka_kernels import cpu_kernel

    log = init_logger(f"vllm.{__name__}")
    if not settings.get("MOKA_CPU_KERNEL"):
        log.info("moka-serve: MOKA_CPU_KERNEL=0: the torch path serves every CPU batch")
        return
    why = cpu_kernel.load(cache_dir() / "kernels")
    if why is None:
        import torch

        threads = torch.get_num_threads()
        which = (
            "every batch (torch runs on one thread here)"
            if threads == 1
            else f"batches of up to {cpu_kernel.MAX_TOKENS} tokens (torch runs on {threads} "
            "threads: its GEMMs take larger ones)"
        )
        log.info("moka-serve: the C++ CPU kernel serves %s", which)
    else:
        log.warning("moka-serve: %s; the torch path serves every CPU batch", why)


def _log_slot_memory(manager) -> None:
    from vllm.logger import init_logger

    m = slot_memory(manager)
    rank = manager.lora_config.max_lora_rank
    lora = (
        "no LoRA buffers (MoKA-only: LoRA adapters are refused)"
        if manager.moka_only
        else f"LoRA buffers {m['lora_bytes'] / 2**20:.2f} MiB (max_lora_rank {rank})"
    )
    storage = (
        f"MoKA pools {m['moka_pool_bytes'] / 2**20:.2f} MiB preallocated"
        if m["moka_pool_bytes"]
        else f"MoKA storage grows with the adapters held (capacity "
        f"{m['moka_capacity_bytes'] / 2**20:.2f} MiB)"
    )
    # Under vLLM's "vllm" logger, whose handler prints INFO (a logger of our own name prints
    # nothing: Python's default level is WARNING).
    init_logger(f"vllm.{__name__}").info(
        "moka-serve: %d adapter slots; per slot: %s, %s, slot tables %.3f MiB",
        manager.lora_slots,
        lora,
        storage,
        m["moka_table_bytes"] / 2**20,
    )
