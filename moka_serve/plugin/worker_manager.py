"""Worker-manager patch: ``peft_type`` dispatch in vLLM's adapter loader.

:func:`load_adapter_with_moka` replaces ``LRUCacheWorkerLoRAManager._load_adapter``: it reads
``adapter_config.json``'s ``peft_type`` before vLLM's ``PEFTHelper`` and routes MOKA to
:func:`~moka_serve.plugin.lora_model.load_moka_model` and checks what vLLM's own loader makes of
a LoRA folder (:func:`~moka_serve.plugin.lora_model.check_lora_model`); :func:`install` also points
``_manager_cls`` at :class:`~moka_serve.plugin.model_manager.MokaLRUCacheLoRAModelManager`,
retires an adapter's snapshot when it is unloaded (``remove_adapter``) and drops retired ones at
the first step that no longer runs them (``set_active_adapters``; ``snapshots.py`` says why).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import msgspec
from vllm.exceptions import LoRAAdapterNotFoundError
from vllm.lora.utils import get_adapter_absolute_path

from .lora_model import (
    check_lora_model,
    check_peft_type,
    load_moka_model,
    lora_as_moka_model,
    read_peft_type,
)
from .model_manager import MokaLRUCacheLoRAModelManager
from .snapshots import SNAPSHOTS

_ORIGINAL_LOAD_ADAPTER: Callable | None = None
_ORIGINAL_REMOVE_ADAPTER: Callable | None = None
_ORIGINAL_SET_ACTIVE_ADAPTERS: Callable | None = None

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
    """Load from a snapshot of the folder (``snapshots.py``): taken and validated the first
    time, reused by every reload of the same adapter after eviction."""
    path = get_adapter_absolute_path(lora_request.lora_path)
    key = (lora_request.lora_int_id, path)
    if SNAPSHOTS.is_retired(key[0]) and not getattr(self, "_moka_in_step", False):
        SNAPSHOTS.drop_id(key[0])  # loaded again after an unload: the folder as it is now
    snap = None if lora_request.load_inplace else SNAPSHOTS.get(key)
    fresh = snap is None
    if fresh:
        if not _is_dir(path):
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
        SNAPSHOTS.drop(key)
        snap = SNAPSHOTS.take(key, path)
    try:
        return _load_folder(self, msgspec.structs.replace(lora_request, lora_path=str(snap)))
    except Exception as e:
        if fresh:
            SNAPSHOTS.drop(key)  # nothing invalid is kept
        # Messages name the user's folder, not the snapshot.
        if isinstance(e, LoRAAdapterNotFoundError):
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from None
        if isinstance(e, (ValueError, KeyError)):
            raise type(e)(str(e).replace(str(snap), path)) from None
        raise


def _load_folder(self, lora_request):
    assert _ORIGINAL_LOAD_ADAPTER is not None
    path = lora_request.lora_path
    peft_type = read_peft_type(path)  # None: no config, vLLM's loader gives its not-found
    check_peft_type(peft_type, path)
    if peft_type == "MOKA":
        return load_moka_model(self._adapter_manager, lora_request, path)
    if getattr(self._adapter_manager, "moka_only", False):
        raise ValueError(
            f"LoRA adapter {lora_request.lora_name!r}: this engine serves MoKA adapters only "
            "(MOKA_ONLY=1, set by moka-serve --moka-only or for a folder of MoKA adapters); "
            "restart without it, with --max-lora-rank R, to serve LoRA adapters"
        )
    try:
        lora = _ORIGINAL_LOAD_ADAPTER(self, lora_request)
    except (LoRAAdapterNotFoundError, ValueError, KeyError):
        raise
    except Exception as e:  # e.g. safetensors' own error for a truncated or corrupt file
        raise ValueError(
            f"LoRA adapter {lora_request.lora_name!r}: cannot read its weights (truncated or "
            f"corrupt?): {type(e).__name__}: {e}"
        ) from None
    where = f"LoRA adapter {lora_request.lora_name!r}"
    check_lora_model(self._adapter_manager, lora, where)
    return lora_as_moka_model(self._adapter_manager, lora, where) or lora


def remove_adapter_with_snapshot(self, adapter_id: int) -> bool:
    """``WorkerLoRAManager.remove_adapter`` (an explicit unload): the adapter's admission into
    the MoKA pools goes too, and its snapshot is retired (requests already running with it
    may load it again in the next steps)."""
    SNAPSHOTS.retire_id(adapter_id)
    manager = getattr(self, "_adapter_manager", None)
    if isinstance(manager, MokaLRUCacheLoRAModelManager):
        manager.release_moka(adapter_id)
    return _ORIGINAL_REMOVE_ADAPTER(self, adapter_id)


def set_active_adapters_with_snapshots(self, requests, mapping) -> None:
    """``WorkerLoRAManager.set_active_adapters`` (once per step): retired snapshots of adapters
    no request of this step runs are dropped first; loads inside the step may read the others.

    ``load_inplace`` is dropped from the step's requests: every request sent after an in-place
    load carries it, and vLLM then loaded the adapter again from its folder in every step (a
    folder changed by then killed the engine); the in-place load itself read the folder."""
    assert _ORIGINAL_SET_ACTIVE_ADAPTERS is not None
    requests = [
        msgspec.structs.replace(r, load_inplace=False) if r.load_inplace else r
        for r in requests
        if r
    ]
    SNAPSHOTS.sweep({r.lora_int_id for r in requests})
    self._moka_in_step = True
    try:
        _ORIGINAL_SET_ACTIVE_ADAPTERS(self, requests, mapping)
    finally:
        self._moka_in_step = False


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


def install() -> None:
    """Point vLLM's LRU worker manager at the MoKA manager and loader (idempotent)."""
    global _ORIGINAL_LOAD_ADAPTER, _ORIGINAL_REMOVE_ADAPTER, _ORIGINAL_SET_ACTIVE_ADAPTERS
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    if LRUCacheWorkerLoRAManager._load_adapter is load_adapter_with_moka:
        return
    _ORIGINAL_LOAD_ADAPTER = LRUCacheWorkerLoRAManager._load_adapter
    LRUCacheWorkerLoRAManager._manager_cls = MokaLRUCacheLoRAModelManager
    LRUCacheWorkerLoRAManager._load_adapter = load_adapter_with_moka
    _ORIGINAL_REMOVE_ADAPTER = LRUCacheWorkerLoRAManager.remove_adapter
    LRUCacheWorkerLoRAManager.remove_adapter = remove_adapter_with_snapshot
    _ORIGINAL_SET_ACTIVE_ADAPTERS = LRUCacheWorkerLoRAManager.set_active_adapters
    LRUCacheWorkerLoRAManager.set_active_adapters = set_active_adapters_with_snapshots
