"""Adapter inventory for operators: ``GET /v1/moka/adapters`` and ``GET /v1/moka/adapters/{name}``.

Lists every adapter the server knows (``--lora-modules``, runtime-loaded, resolver-found) plus
folders of ``MOKA_ADAPTER_DIR`` not requested yet, with its kind (MOKA or LORA), base model,
targets, component shapes, trainable parameters, gate weights and where it is now: ``disk``,
``cpu`` (vLLM's CPU LRU cache, ``max_cpu_loras``) or ``slot N`` (device slot, ``max_loras``).

The router is added to vLLM's FastAPI app by wrapping ``attach_endpoint_plugins`` (called by
``build_app`` after the core routers; ``admin.install``) rather than through a
``vllm.endpoint_plugins`` entry point, which vLLM loads only when it is named in
``VLLM_PLUGINS`` (an allow-list that would also filter the general plugins). Server paths
(``path``, a local ``base_model``, paths in error texts) are shown to admin clients only
(``moka_core.admin_access``). Where an adapter lives is asked from the worker with
``collective_rpc("moka_adapter_state")``, a method this plugin adds to vLLM's ``WorkerBase``.

Descriptions come from configs and safetensors headers (plus MoKA's tiny gate tensors), never a
full load; they are computed in a thread, off the API server's event loop, and cached by the
folder's file names, sizes and modification times, so a listing of a thousand folders neither
stalls the streams being served nor repeats work for folders that did not change. Folders of
``MOKA_ADAPTER_DIR`` are listed by the resolver's rule (``adapter_dir.adapter_folder``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

# Module level (not inside build_router): with postponed annotations FastAPI resolves the
# ``Request`` annotation of the handlers in this module's globals.
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from moka_core import settings
from moka_core.adapter_dir import adapter_folders, folder_signature
from moka_core.adapter_format import config_kind, read_config_json
from moka_core.admin_access import ADMIN_HEADER, is_admin

# (folder, folder_signature) -> description; insertion order, oldest dropped first.
MAX_DESCRIPTIONS = 4096
_DESCRIPTIONS: dict[tuple[str, tuple], dict[str, Any]] = {}


def worker_adapter_state(self) -> dict[str, list]:
    """Installed as ``WorkerBase.moka_adapter_state``: adapter ids in the CPU cache and slots."""
    runner = getattr(self, "model_runner", None)
    lora = getattr(runner, "lora_manager", None)
    manager = getattr(lora, "_adapter_manager", None)
    if manager is None:
        return {"cpu": [], "slots": [], "pools": {}}
    from .model_manager import slot_memory

    pools = {
        name: {
            "capacity_numel": m.moka_bank.pool_numel,
            "held_numel": m.moka_bank.held_numel,
            "admitted_adapters": len(m.moka_bank.admitted),
            "preallocated": m.moka_bank.pool is not None,
        }
        for name, m in manager.moka_layers().items()
    }
    return {
        "cpu": sorted(manager.list_adapters()),
        "slots": list(manager.lora_index_to_id),
        "pools": pools,
        "slot_memory": slot_memory(manager),
    }


def _describe_moka(folder: Path) -> dict[str, Any]:
    """From the config and the weights' header, plus the (tiny) gate tensors: no full load."""
    import math

    import torch
    from safetensors import safe_open

    from moka_core.adapter_format import (
        PEFT_PREFIX,
        WEIGHTS_NAME,
        read_adapter_config,
        read_tensor_shapes,
    )

    cfg = read_adapter_config(folder)
    shapes = read_tensor_shapes(folder)
    modules = {k[len(PEFT_PREFIX) :].split(".moka_")[0] for k in shapes}
    gate_keys = sorted(k for k in shapes if k.endswith(".moka_gate"))
    probs: dict[str, list[torch.Tensor]] = {}
    if gate_keys:
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
            for key in gate_keys:
                target = cfg.target_for(key[len(PEFT_PREFIX) : -len(".moka_gate")])
                if target is not None:
                    probs.setdefault(target, []).append(
                        torch.softmax(f.get_tensor(key).double(), 0)
                    )
    gates = {  # mean over the layers, per component
        t: [round(float(v), 6) for v in torch.stack(p).mean(0)] for t, p in probs.items()
    }
    return {
        "kind": "MOKA",
        "base_model": cfg.base_model_name_or_path,
        "variant": cfg.variant,
        "targets": cfg.to_dict()["targets"],
        "modules": len(modules),
        "trainable_parameters": sum(math.prod(shape) for shape in shapes.values()),
        "gating": cfg.gating,
        "scaling": cfg.scaling,
        "gates": gates,
    }


def _describe_lora(folder: Path, cfg: dict) -> dict[str, Any]:
    params = 0
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                params += n
    return {
        "kind": "LORA",
        "base_model": cfg.get("base_model_name_or_path", ""),
        "targets": cfg.get("target_modules"),
        "rank": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "trainable_parameters": params,
    }


def describe_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Static description of an adapter folder, cached by the folder's file sizes and times
    (blocking: the inventory calls it off the event loop); errors are reported, not raised."""
    folder = Path(path)
    try:
        key = (str(folder.resolve()), folder_signature(folder))
    except OSError:
        return {"kind": None, "error": "adapter folder not found"}
    if key not in _DESCRIPTIONS:
        try:
            cfg = read_config_json(folder / "adapter_config.json")
            kind = config_kind(cfg)
            if kind == "MOKA":
                desc = _describe_moka(folder)
            elif kind == "LORA":
                desc = _describe_lora(folder, cfg)
            else:
                desc = {"kind": kind, "error": f"unsupported peft_type {kind!r}"}
        except Exception as e:  # an inventory must list broken adapters, not fail on them
            desc = {"kind": None, "error": str(e)}
        _DESCRIPTIONS[key] = desc
        while len(_DESCRIPTIONS) > MAX_DESCRIPTIONS:
            _DESCRIPTIONS.pop(next(iter(_DESCRIPTIONS)))
    return dict(_DESCRIPTIONS[key])


def _location(lora_id: int | None, state: dict[str, list]) -> str:
    if lora_id is not None and lora_id in state.get("slots", []):
        return f"slot {state['slots'].index(lora_id)}"
    if lora_id is not None and lora_id in state.get("cpu", []):
        return "cpu"
    return "disk"


async def inventory(app_state) -> dict[str, dict[str, Any]]:
    """name -> description and location, for every known adapter."""
    models = app_state.openai_serving_models
    state: dict[str, list] = {"cpu": [], "slots": []}
    engine = getattr(app_state, "engine_client", None)
    if engine is not None:
        try:
            state = (await engine.collective_rpc("moka_adapter_state"))[0]
        except Exception:  # the inventory stays available if the engine cannot answer
            pass
    known = {name: (req.lora_path, req.lora_int_id) for name, req in models.lora_requests.items()}
    root = settings.get("MOKA_ADAPTER_DIR") or ""
    # Off the event loop: reading a thousand headers must not stall the streams being served.
    return await asyncio.to_thread(_describe_all, known, root, state)


def _describe_all(
    known: dict[str, tuple[str, int]], root: str, state: dict[str, list]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (path, lora_id) in sorted(known.items()):
        out[name] = {
            "name": name,
            "path": path,
            "id": lora_id,
            "location": _location(lora_id, state),
            **describe_adapter(path),
        }
    if root and os.path.isdir(root):
        # The resolver's rule: names, symlinks out of the folder (adapter_dir.py).
        for name, folder in adapter_folders(Path(root)).items():
            if name in out:
                continue
            out[name] = {
                "name": name,
                "path": str(folder),
                "id": None,
                "location": "disk",
                **describe_adapter(folder),
            }
    return out


async def _visible_inventory(request: Request) -> dict[str, dict[str, Any]]:
    """The inventory as this client may see it: server paths for admin clients only."""
    items = await inventory(request.app.state)
    if is_admin(request.headers.get(ADMIN_HEADER)):
        return items
    return {name: without_paths(item) for name, item in items.items()}


def without_paths(item: dict[str, Any]) -> dict[str, Any]:
    """An inventory entry with no server path in it: no ``path``, a local ``base_model`` by its
    folder name, the adapter's folder named ``<adapter folder>`` in error texts."""
    out = {k: v for k, v in item.items() if k != "path"}
    base = out.get("base_model")
    if isinstance(base, str) and (base.startswith(("/", "~")) or os.path.isabs(base)):
        out["base_model"] = Path(base).name
    path, error = item.get("path"), out.get("error")
    if isinstance(error, str) and path:
        out["error"] = error.replace(str(path), "<adapter folder>")
    return out


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/moka/adapters")
    async def list_adapters(raw_request: Request):
        items = await _visible_inventory(raw_request)
        return JSONResponse({"object": "list", "data": list(items.values())})

    @router.get("/v1/moka/pools")
    async def pools(raw_request: Request):
        """Slot count, bytes per slot and each layer's MoKA pool use (rank 0)."""
        engine = getattr(raw_request.app.state, "engine_client", None)
        try:
            state = (await engine.collective_rpc("moka_adapter_state"))[0]
        except Exception as e:  # noqa: BLE001 - reported, the server goes on
            return JSONResponse({"error": {"message": f"engine did not answer: {e}",
                                           "type": "ServiceUnavailable", "code": 503}},
                                status_code=503)  # fmt: skip
        return JSONResponse(
            {
                "slots": len(state.get("slots", [])),
                "slot_memory": state.get("slot_memory", {}),
                "layers": state.get("pools", {}),
            }  # fmt: skip
        )

    @router.get("/v1/moka/adapters/{name}")
    async def get_adapter(name: str, raw_request: Request):
        items = await _visible_inventory(raw_request)
        if name not in items:
            return JSONResponse(
                {
                    "error": {
                        "message": f"The adapter `{name}` does not exist.",
                        "type": "NotFoundError",
                        "code": 404,
                    }
                },
                status_code=404,
            )
        return JSONResponse(items[name])

    return router


def install() -> None:
    """Add the worker method (the router is attached by ``admin.install``)."""
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.moka_adapter_state = worker_adapter_state
