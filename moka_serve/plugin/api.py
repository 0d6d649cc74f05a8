"""API-server side: adapter validation errors answered with 400, not vLLM's 500.

``OpenAIServingModels.load_lora_adapter`` turns any failure of ``engine_client.add_lora`` into
``500 InternalServerError``. The exception crosses the engine-core process boundary as text, so
the worker's loader marks validation failures with :data:`worker_manager.INVALID_ADAPTER` and this
wrapper re-labels those responses as ``400 BadRequestError`` with the same message. For the
resolver path vLLM answers 400 "found but could not be loaded" without the reason; the wrapper
adds the format-level reason for folders of ``MOKA_ADAPTER_DIR``.
"""

from __future__ import annotations

import asyncio
import functools
import os
from http import HTTPStatus
from pathlib import Path

from moka_serve.adapter_dir import adapter_folder

from .worker_manager import INVALID_ADAPTER


def _bad_request(message: str):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(
        message=message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
    )


def _format_problem(folder: Path) -> str | None:
    """Why a folder is not a loadable adapter, checked without the engine (None if it is)."""
    from moka_serve.adapter_format import load_adapter

    from .lora_model import check_peft_type, read_peft_type

    try:
        peft_type = read_peft_type(folder)
        check_peft_type(peft_type, str(folder))
        if peft_type == "MOKA":
            load_adapter(folder)
    except ValueError as e:
        return str(e)
    return None


def install() -> None:
    """Wrap ``OpenAIServingModels.load_lora_adapter`` and ``resolve_lora`` (idempotent)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    original_load = OpenAIServingModels.load_lora_adapter
    if getattr(original_load, "__moka__", False):
        return

    @functools.wraps(original_load)
    async def load_lora_adapter(self, request, base_model_name=None):
        result = await original_load(self, request, base_model_name)
        if (
            isinstance(result, ErrorResponse)
            and result.error.code == HTTPStatus.INTERNAL_SERVER_ERROR
            and INVALID_ADAPTER in result.error.message
        ):
            return _bad_request(result.error.message)
        return result

    original_resolve = OpenAIServingModels.resolve_lora

    @functools.wraps(original_resolve)
    async def resolve_lora(self, lora_name):
        result = await original_resolve(self, lora_name)
        root = os.environ.get("MOKA_ADAPTER_DIR", "").strip()
        if (
            isinstance(result, ErrorResponse)
            and result.error.code == HTTPStatus.BAD_REQUEST
            and root
        ):
            folder = adapter_folder(Path(root).resolve(), lora_name)
            # Off the event loop: reading a large adapter must not stall other streams.
            problem = None if folder is None else await asyncio.to_thread(_format_problem, folder)
            if problem:
                return _bad_request(f"{result.error.message} {INVALID_ADAPTER}: {problem}")
        return result

    load_lora_adapter.__moka__ = True  # type: ignore[attr-defined]
    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.resolve_lora = resolve_lora
