"""API-server side: adapter validation errors answered with 400 and their reason; loads by path
only from the allowed roots (403 otherwise, ``moka_core.admin_access``).

``OpenAIServingModels.load_lora_adapter`` turns any failure of ``engine_client.add_lora`` into
``500 InternalServerError``. The exception crosses the engine-core process boundary as text, so
the worker's loader marks validation failures with :data:`worker_manager.INVALID_ADAPTER` and this
wrapper re-labels those responses as ``400 BadRequestError`` with the same message.

For the resolver path vLLM answers 400 "found but could not be loaded" and only logs the
engine's reason; the wrapper records the reason as ``add_lora`` raises it and adds it to the
answer (no second load). On both routes an adapter that failed validation is remembered, by name
and folder, with the names, sizes and modification times of the folder's files: a retry of the
same unchanged folder is answered at once, without the engine; any change to the folder makes it
load again.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from http import HTTPStatus
from pathlib import Path

from moka_core import settings
from moka_core.adapter_dir import adapter_folder, folder_signature
from moka_core.admin_access import path_problem

from .worker_manager import INVALID_ADAPTER

# Adapters that failed validation: (name, folder) -> (folder_signature, answer).
MAX_REMEMBERED_FAILURES = 1024
_FAILED: OrderedDict[tuple[str, str], tuple[tuple, str]] = OrderedDict()


def _bad_request(message: str):
    return _error(message, "BadRequestError", HTTPStatus.BAD_REQUEST)


def _error(message: str, err_type: str, status: HTTPStatus):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(message=message, err_type=err_type, status_code=status)


async def _signature(folder: str | Path | None) -> tuple | None:
    """``folder_signature`` off the event loop (a slow disk must not stall other streams)."""
    if folder is None:
        return None
    try:
        return await asyncio.to_thread(folder_signature, Path(folder))
    except (OSError, ValueError):
        return None


def _remembered(key: tuple[str, str], signature: tuple | None) -> str | None:
    """The answer given when this (name, folder) last failed, if the folder is unchanged."""
    hit = _FAILED.get(key)
    return hit[1] if hit is not None and signature is not None and hit[0] == signature else None


def _remember(key: tuple[str, str], signature: tuple | None, answer: str) -> None:
    if signature is None:
        return
    _FAILED[key] = (signature, answer)
    _FAILED.move_to_end(key)
    while len(_FAILED) > MAX_REMEMBERED_FAILURES:
        _FAILED.popitem(last=False)


def _record_add_lora_errors(serving) -> dict[str, str]:
    """Wrap this server's ``engine_client.add_lora`` once: the last failure per adapter name."""
    errors = getattr(serving, "_moka_add_lora_errors", None)
    if errors is not None:
        return errors
    errors = serving._moka_add_lora_errors = {}
    original = serving.engine_client.add_lora

    @functools.wraps(original)
    async def add_lora(lora_request, *args, **kwargs):
        try:
            return await original(lora_request, *args, **kwargs)
        except BaseException as e:
            errors[lora_request.lora_name] = str(e)
            raise

    serving.engine_client.add_lora = add_lora
    return errors


def _started_with(serving, request) -> bool:
    """Whether ``request`` is one of the server's ``--lora-modules`` (the operator's command line,
    loaded by ``init_static_loras`` at start-up): those paths are trusted wherever they are."""
    static = getattr(serving, "static_lora_modules", None) or ()
    name, path = getattr(request, "lora_name", None), getattr(request, "lora_path", None)
    return any(m.name == name and m.path == path for m in static)


def install() -> None:
    """Wrap ``OpenAIServingModels.load_lora_adapter`` and ``resolve_lora`` (idempotent)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    original_load = OpenAIServingModels.load_lora_adapter
    if getattr(original_load, "__moka__", False):
        return

    @functools.wraps(original_load)
    async def load_lora_adapter(self, request, base_model_name=None):
        path = getattr(request, "lora_path", None)
        if path and not _started_with(self, request) and (problem := path_problem(str(path))):
            return _error(problem, "PermissionDenied", HTTPStatus.FORBIDDEN)
        key = (str(getattr(request, "lora_name", "")), str(path))
        signature = await _signature(path) if path else None
        if (answer := _remembered(key, signature)) is not None:
            return _bad_request(answer)
        result = await original_load(self, request, base_model_name)
        if (
            isinstance(result, ErrorResponse)
            and result.error.code == HTTPStatus.INTERNAL_SERVER_ERROR
            and INVALID_ADAPTER in result.error.message
        ):
            _remember(key, signature, result.error.message)
            return _bad_request(result.error.message)
        return result

    original_resolve = OpenAIServingModels.resolve_lora

    @functools.wraps(original_resolve)
    async def resolve_lora(self, lora_name):
        root = settings.get("MOKA_ADAPTER_DIR")
        folder = adapter_folder(Path(root).resolve(), lora_name) if root else None
        key = (lora_name, str(folder))
        signature = await _signature(folder)
        if folder is not None and (answer := _remembered(key, signature)) is not None:
            return _bad_request(answer)
        errors = _record_add_lora_errors(self)
        errors.pop(lora_name, None)
        result = await original_resolve(self, lora_name)
        reason = errors.pop(lora_name, None)
        if (
            isinstance(result, ErrorResponse)
            and result.error.code == HTTPStatus.BAD_REQUEST
            and folder is not None
        ):
            answer = result.error.message
            if reason:  # from the marker on: the engine's wrapping adds nothing for a user
                answer += " " + reason[max(reason.find(INVALID_ADAPTER), 0) :]
            _remember(key, signature, answer)
            return _bad_request(answer)
        return result

    load_lora_adapter.__moka__ = True  # type: ignore[attr-defined]
    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.resolve_lora = resolve_lora
