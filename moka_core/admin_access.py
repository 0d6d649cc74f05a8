"""Who may administer adapters, and from where they may be loaded (no vLLM here).

vLLM's runtime adapter endpoints (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``) come
with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which the plugin's resolver needs, and vLLM's
``--api-key`` is one key for inference and administration alike. So the plugin closes them
itself (``plugin/admin.py``), by these rules:

* ``MOKA_ADMIN_KEY`` (``moka-serve --admin-key``): the admin credential, sent by admin clients in
  the ``X-Moka-Admin-Key`` header. Unset: the admin endpoints are off (403) and the resolver
  still serves the folders of ``MOKA_ADAPTER_DIR``. Wrong or missing: 401.
* Allowed roots: ``MOKA_ADAPTER_DIR`` plus ``MOKA_ADMIN_ROOTS`` (folders separated by ``:``,
  ``moka-serve --admin-root``). A ``lora_path`` whose folder or adapter files resolve outside
  every root is refused with 403 and the reason, admin or not.
* Admin clients see server paths in the inventory (``/v1/moka/adapters``); others do not.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from moka_core import settings
from moka_core.adapter_dir import stays_inside

ENV_ADMIN_KEY = "MOKA_ADMIN_KEY"
ENV_ADMIN_ROOTS = "MOKA_ADMIN_ROOTS"
ENV_ADAPTER_DIR = "MOKA_ADAPTER_DIR"
ADMIN_HEADER = "X-Moka-Admin-Key"
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
# vLLM also registers its load/unload handlers as SageMaker's adapter routes
# (``model_hosting_container_standards``): ``POST /adapters``, ``DELETE /adapters/{name}``.
SAGEMAKER_ADAPTER_ROUTE = "/adapters"


def is_admin_path(path: str) -> bool:
    """Whether an HTTP path loads, unloads or lists adapters by path (the admin surface)."""
    return (
        path in ADMIN_PATHS
        or path == SAGEMAKER_ADAPTER_ROUTE
        or path.startswith(SAGEMAKER_ADAPTER_ROUTE + "/")
    )


def admin_key() -> str | None:
    """The configured admin credential, or None (admin endpoints off)."""
    return settings.get(ENV_ADMIN_KEY)


def is_admin(presented: str | None) -> bool:
    """Whether ``presented`` (the header's value) is the admin credential (constant time)."""
    key = admin_key()
    if key is None or presented is None:
        return False
    return hmac.compare_digest(presented.encode(), key.encode())


def allowed_roots(env: Mapping[str, str] | None = None) -> list[Path]:
    """The folders adapters may be loaded from by path, resolved (``env``: the process's)."""
    raw = [settings.get(ENV_ADAPTER_DIR, env) or ""]
    raw += (settings.get(ENV_ADMIN_ROOTS, env) or "").split(os.pathsep)
    return [Path(r.strip()).expanduser().resolve() for r in raw if r.strip()]


def path_problem(lora_path: str) -> str | None:
    """Why ``lora_path`` may not be loaded (outside every allowed root), or None."""
    roots = allowed_roots()
    if not roots:
        return (
            f"adapters are loaded by path only from allowed roots, and this server has none "
            f"(start it with --adapters DIR or --admin-root DIR; {ENV_ADMIN_ROOTS})"
        )
    folder = Path(lora_path).expanduser()
    try:
        if any(stays_inside(root, folder) for root in roots):
            return None
    except (OSError, ValueError, RuntimeError):
        pass
    return (
        f"lora_path {lora_path!r} is outside the folders adapters may be loaded from "
        f"({', '.join(str(r) for r in roots)}; add one with --admin-root, {ENV_ADMIN_ROOTS})"
    )


def key_problem(admin: str | None, api_key: str | None) -> str | None:
    """Why an admin credential cannot be used with this inference API key, or None."""
    if admin is not None and not admin.strip():
        return "the admin key is empty"
    if admin is not None and api_key is not None and admin == api_key:
        return "the admin key must differ from --api-key (every inference client holds that one)"
    return None
