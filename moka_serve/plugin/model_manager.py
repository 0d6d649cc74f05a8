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
from .layers import AdapterLayerMixin, MokaLayerMixin, MokaLogitsProcessorWithLoRA
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

    def moka_layers(self) -> dict[str, MokaLayerMixin]:
        return {n: m for n, m in self.modules.items() if isinstance(m, MokaLayerMixin)}

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
        entries = adapter.moka_entries if isinstance(adapter, MokaLoRAModel) else {}
        for name, module in self.moka_layers().items():
            layer_entries = entries.get(name)
            if layer_entries:
                module.set_moka(index, layer_entries)
            else:
                module.reset_moka(index)
        return activated
