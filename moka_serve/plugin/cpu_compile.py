"""Compilation stays on for adapter-enabled CPU engines (``MOKA_COMPILE=0`` opts out).

vLLM 0.32's ``CpuPlatform.check_and_update_config`` ends its compilation set-up with
``if vllm_config.lora_config is not None: compilation_config.mode = CompilationMode.NONE``: on
CPU an engine with ``--enable-lora`` runs eager, so every request (base ones too) pays ~1.4-1.5x
per token against the plain engine. vLLM does it because its CPU punica wrapper branches in
Python on per-step state. The MoKA layers run all adapter work (vLLM's LoRA ops included) inside
one opaque custom op per layer (``layers.py``), so the traced graph holds no such branch and the
mode vLLM would have chosen without LoRA can be restored.

The wrapper only undoes that one line: when the mode was ``VLLM_COMPILE`` on entry (the CPU
code then switches it to ``DYNAMO_TRACE_ONCE`` with the inductor backend), the mode leaves as
``DYNAMO_TRACE_ONCE`` even with LoRA on. ``enforce_eager`` (mode ``NONE`` on entry) and explicit
compilation modes are left alone.
"""

from __future__ import annotations

import functools

ENV = "MOKA_COMPILE"


def compile_enabled() -> bool:
    from moka_core import settings

    return settings.get(ENV)


def install() -> None:
    """Wrap ``CpuPlatform.check_and_update_config`` (idempotent)."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__
    if getattr(original, "__moka__", False):
        return

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config) -> None:
        config = vllm_config.compilation_config
        would_compile = config.mode == CompilationMode.VLLM_COMPILE
        original(cls, vllm_config)
        if (
            vllm_config.lora_config is not None
            and would_compile
            and config.mode == CompilationMode.NONE
            and compile_enabled()
        ):
            config.mode = CompilationMode.DYNAMO_TRACE_ONCE

    check_and_update_config.__moka__ = True  # type: ignore[attr-defined]
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
