"""Fixes for vLLM 0.32 telling adapters apart by name where only their ids differ.

One name can stand for two loads of an adapter: unloaded and loaded again (over
``/v1/unload_lora_adapter`` and ``/v1/load_lora_adapter``, or through the resolver) while
requests of the first load still run, or with other weights from the same folder. vLLM gives
each load its own ``lora_int_id``, but

* the model runners hand each step's adapters to the worker's LoRA manager as a ``set`` of
  ``LoRARequest``s (``InputBatch.make_lora_inputs``; ``LoraState.get_activate_loras`` in the v2
  runner), and ``LoRARequest`` hashes and compares by ``lora_name`` alone: two ids under one name
  became one, the other was never activated, its tokens' mapping named it anyway, and
  ``convert_mapping`` raised ``KeyError`` inside the step, which kills the engine core (found by
  ``moka-bench soak``). The fix hands the manager one request per ``lora_int_id`` (what
  ``WorkerLoRAManager._apply_adapters`` keys them by anyway), as a list;
* the prefix cache keys an adapter's KV blocks by name and path
  (``kv_cache_utils._gen_lora_extra_hash_keys``), so a prompt sent after the folder was
  re-saved and loaded again reused KV computed with the old weights: its tokens were neither
  adapter's. The fix adds the id to the key. (vLLM's ``load_inplace`` keeps the id: it logs its
  own warning that such blocks are not invalidated.)

All three are patched here, in place, at start-up (``checks.py`` checks the names first).
"""

from __future__ import annotations

from collections.abc import Callable

ORIGINALS: dict[str, Callable] = {}


def one_per_id(requests) -> list:
    """``requests`` (LoRARequests or None), one per ``lora_int_id``, first seen kept, in order."""
    by_id: dict[int, object] = {}
    for request in requests:
        if request is not None:
            by_id.setdefault(request.lora_int_id, request)
    return list(by_id.values())


def make_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens):
    """``InputBatch.make_lora_inputs``, its third item one request per adapter id (the batch
    already keys them by id: ``lora_id_to_lora_request``)."""
    prompt_mapping, token_mapping, _merged = ORIGINALS["make_lora_inputs"](
        self, num_scheduled_tokens, num_sampled_tokens
    )
    return prompt_mapping, token_mapping, list(self.lora_id_to_lora_request.values())


def get_activate_loras(self, req_ids: list[str]) -> list:
    """``LoraState.get_activate_loras`` (the v2 runner), one request per adapter id."""
    return one_per_id(self.lora_requests.get(req_id) for req_id in req_ids)


def lora_hash_keys(request) -> list:
    """``kv_cache_utils._gen_lora_extra_hash_keys``: vLLM's key (``"lora"``, name, path), and
    the adapter's id."""
    keys = ORIGINALS["_gen_lora_extra_hash_keys"](request)
    if not keys:
        return keys
    return [(*key, request.lora_request.lora_int_id) for key in keys]


make_lora_inputs.__moka_fixed__ = True  # type: ignore[attr-defined]


def install() -> None:
    """Patch both runners' collections and the prefix-cache key (idempotent)."""
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.worker.gpu.lora_utils import LoraState
    from vllm.v1.worker.gpu_input_batch import InputBatch

    if getattr(InputBatch.make_lora_inputs, "__moka_fixed__", False):
        return
    ORIGINALS["make_lora_inputs"] = InputBatch.make_lora_inputs
    ORIGINALS["get_activate_loras"] = LoraState.get_activate_loras
    ORIGINALS["_gen_lora_extra_hash_keys"] = kv_cache_utils._gen_lora_extra_hash_keys
    InputBatch.make_lora_inputs = make_lora_inputs
    LoraState.get_activate_loras = get_activate_loras
    kv_cache_utils._gen_lora_extra_hash_keys = lora_hash_keys
