"""vLLM plugin: makes MoKA adapters first-class ``LoRARequest``s (issue #4).

Registered through the ``vllm.general_plugins`` entry point; vLLM calls :func:`register` once in
every process (API server, engine core, workers) before models are built. All vLLM-specific code
of the project lives in this package:

* ``checks``: version pin (vLLM 0.32.0) and signature checks of every private name patched.
* ``layers``: MoKA layer classes swapped into ``vllm.lora.utils._all_lora_classes``; all adapter
  work of a layer runs in one custom op, ``moka_serve::adapters``.
* ``kernel_metadata``: the step's token -> slot grouping, built once per step.
* ``lora_model`` / ``model_manager`` / ``worker_manager``: MoKA adapters as ``LoRAModel``s, the
  manager (``_manager_cls``) that activates them, and the ``peft_type`` dispatch in
  ``LRUCacheWorkerLoRAManager._load_adapter``.
* ``cpu_compile``: compilation kept on for LoRA-enabled CPU engines (``MOKA_COMPILE=0`` opts out).
* ``cpu_fix``: vLLM's CPU LoRA ops gave slot -1 tokens the last slot's LoRA.
* ``same_name_fix``: a step with two adapter ids under one name activated only one of them (the
  engine core died).
* ``resolver``: adapters of ``MOKA_ADAPTER_DIR`` found by name on first request.
* ``api``: adapter validation errors answered with 400 (vLLM answers 500).
* ``inventory``: ``GET /v1/moka/adapters[/{name}]`` for operators.
* ``admin``: the admin endpoints closed without the admin key (``moka_core.admin_access``).
* ``logs``: one warning line, not tracebacks, for each adapter the loader rejects.

Set ``MOKA_DISABLE_PLUGIN=1`` to load vLLM without any of it.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    """Entry point called by vLLM: check the internals, then patch them (idempotent)."""
    global _REGISTERED
    from moka_core import settings

    if _REGISTERED or settings.get("MOKA_DISABLE_PLUGIN"):
        return
    from . import checks

    checks.check_all()
    from . import (
        admin,
        api,
        cpu_compile,
        cpu_fix,
        inventory,
        layers,
        logs,
        resolver,
        same_name_fix,
        worker_manager,
    )

    layers.install()
    worker_manager.install()
    cpu_compile.install()
    if not settings.get("MOKA_DISABLE_CPU_LORA_FIX"):
        cpu_fix.install()
    same_name_fix.install()
    resolver.install()
    api.install()
    inventory.install()
    admin.install()
    logs.install()
    _REGISTERED = True
