"""MoKA adapters as vLLM ``LoRAModel``s: read ``peft_type``, load, validate and fold everything.

vLLM's loader (``LRUCacheWorkerLoRAManager._load_adapter``) runs when an adapter is added
(``--lora-modules``, ``/v1/load_lora_adapter``, a resolver, ``llm.llm_engine.add_lora``); an
exception raised there becomes an error response and the engine keeps serving. An exception in
``activate_adapter`` or in the forward pass kills the engine core. So every check happens here:
format, shapes against the base's real layer dims, finiteness after folding, and the preallocated
bank limits of every layer the adapter touches. Activation then only copies tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from vllm.lora.lora_model import LoRAModel

from moka_kernels import KronEntry
from moka_serve.adapter_format import CONFIG_NAME, PEFT_TYPE, load_adapter, read_config_json

from .layers import MokaLayerMixin

SUPPORTED_PEFT_TYPES = ("MOKA", "LORA")


def read_peft_type(path: str | os.PathLike) -> str | None:
    """``peft_type`` of an adapter folder, or None when there is no readable config.

    A missing config is left to vLLM's loader, which turns it into its usual not-found error.
    """
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return None
    try:
        cfg = read_config_json(file)
    except ValueError as e:
        raise ValueError(f"adapter {str(path)!r}: {e}") from None
    if "peft_type" not in cfg:
        return None  # older LoRA configs may lack it: vLLM's own loader decides
    peft_type = cfg["peft_type"]
    return peft_type if isinstance(peft_type, str) else repr(peft_type)


class MokaLoRAModel(LoRAModel):
    """A MoKA adapter inside vLLM's LoRA machinery: no LoRA weights, folded factors per layer.

    Being a ``LoRAModel`` is what lets vLLM's CPU LRU cache, slots, pinning and scheduler treat it
    like any LoRA. ``moka_entries`` maps a vLLM module name (e.g. ``...self_attn.qkv_proj``) to the
    kernel entries for that layer, already validated against the layer's bank.
    """

    def __init__(
        self,
        lora_model_id: int,
        moka_entries: dict[str, list[KronEntry]],
    ) -> None:
        super().__init__(lora_model_id, rank=1, loras={})
        self.moka_entries = moka_entries

    def clone(self, lora_model_id: int) -> MokaLoRAModel:
        return MokaLoRAModel(lora_model_id, dict(self.moka_entries))


def moka_targets(manager) -> dict[str, tuple[str, int, int, int]]:
    """Adapter module path -> (vLLM module name, slice, out_features, in_features).

    Adapter paths are the checkpoint's (Hugging Face) names; vLLM packs some of them into one
    layer (``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj`` slices 0..2).
    """
    out: dict[str, tuple[str, int, int, int]] = {}
    for name, module in manager.modules.items():
        if not isinstance(module, MokaLayerMixin):
            continue
        widths = module.moka_bank.slice_widths
        in_features = module.moka_bank.in_features
        packed = manager.packed_modules.get(name)
        if packed and len(packed) == len(widths):
            for i, sub in enumerate(packed):
                out[sub] = (name, i, widths[i], in_features)
        else:
            out[name] = (name, 0, sum(widths), in_features)
    return out


def load_moka_model(manager, lora_request, path: str) -> MokaLoRAModel:
    """Load, validate and fold a MoKA adapter folder for this engine's layers."""
    where = f"MoKA adapter {lora_request.lora_name!r} ({path})"
    targets = moka_targets(manager)
    base_dims: dict[str, tuple[int, int]] = {}
    for sub, (_, _, out_f, in_f) in targets.items():
        base_dims.setdefault(sub.rsplit(".", 1)[-1], (out_f, in_f))
    adapter = load_adapter(path, base_dims=base_dims)

    dtype = None
    by_layer: dict[str, list[KronEntry]] = {}
    for module_path, folded in adapter.fold(dtype=torch.float64).items():
        if module_path not in targets:
            raise ValueError(
                f"{where}: module {module_path!r} does not exist in this base model (or is not "
                "a linear layer vLLM can adapt)"
            )
        layer_name, slice_idx, _, _ = targets[module_path]
        layer = manager.modules[layer_name]
        if len(folded.B) > layer.moka_max_components:
            raise ValueError(
                f"{where}: module {module_path!r}: {len(folded.B)} components exceed the limit "
                f"of {layer.moka_max_components} per module (MOKA_MAX_COMPONENTS)"
            )
        dtype = layer.moka_bank.dtype
        for e in folded.kron_entries(slice=slice_idx):
            a = None if e.a is None else e.a.to(dtype)
            b = e.b.to(dtype)
            for t in (a, b):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"{where}: module {module_path!r}: folded factors overflow {dtype}"
                    )
            by_layer.setdefault(layer_name, []).append(KronEntry(b=b, a=a, slice=slice_idx))
    if not by_layer:
        raise ValueError(f"{where}: the adapter has no modules")
    for layer_name, entries in by_layer.items():
        bank = manager.modules[layer_name].moka_bank
        try:
            bank.check_entries(entries)
        except ValueError as e:
            raise ValueError(
                f"{where}: layer {layer_name!r}: {e} (bank limits: MOKA_MAX_COMPONENTS, "
                "MOKA_MAX_FACTOR_NUMEL)"
            ) from None
    return MokaLoRAModel(lora_request.lora_int_id, by_layer)


def check_peft_type(peft_type: str | None, path: str) -> None:
    if peft_type is not None and peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(
            f"adapter at {path!r}: unsupported peft_type {peft_type!r}; this server serves "
            f"{PEFT_TYPE} and LORA adapters"
        )
