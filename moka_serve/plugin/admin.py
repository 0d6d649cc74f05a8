"""The adapter admin surface, closed to clients without the admin credential (issue #22).

vLLM registers ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (and the same handlers
as SageMaker's ``/adapters`` routes) for every client as soon as
``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set, which the plugin's resolver needs. An ASGI
middleware in front of vLLM's app answers those paths itself unless the request carries the
admin credential (``moka_core.admin_access``): 403 when the server has none (the admin surface
is off), 401 when it is missing or wrong. It is added where the inventory's router is, in the
wrapper of ``attach_endpoint_plugins`` that ``build_app`` calls before the server starts.

Loading by path is checked once more where the request body is read (``api.py``): a
``lora_path`` outside the allowed roots is refused with 403, whoever asks.
"""

from __future__ import annotations

from starlette.datastructures import Headers

from moka_core.admin_access import ADMIN_HEADER, ENV_ADMIN_KEY, admin_key, is_admin, is_admin_path


def error_body(message: str, err_type: str, code: int) -> dict:
    """vLLM's error shape (``ErrorResponse``), so OpenAI clients read it as any other."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


class AdminGate:
    """Pure ASGI (no buffering of streamed answers): only the admin paths are looked at."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and is_admin_path(scope.get("path", "")):
            refusal = self.refusal(scope)
            if refusal is not None:
                from fastapi.responses import JSONResponse

                await JSONResponse(refusal, status_code=refusal["error"]["code"])(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)

    @staticmethod
    def refusal(scope) -> dict | None:
        if admin_key() is None:
            return error_body(
                "adapter administration is off on this server: start it with an admin key "
                f"(moka-serve --admin-key, or {ENV_ADMIN_KEY}) to load and unload adapters by "
                "path; adapters in its adapters folder are found by name without it",
                "PermissionDenied",
                403,
            )
        if not is_admin(Headers(scope=scope).get(ADMIN_HEADER)):
            return error_body(
                f"adapter administration needs the admin key in the {ADMIN_HEADER} header",
                "Unauthorized",
                401,
            )
        return None


def install() -> None:
    """Wrap ``attach_endpoint_plugins``: the inventory's router and the admin gate (idempotent)."""
    from vllm.entrypoints.launchers import app as app_module

    from .inventory import build_router

    original = app_module.attach_endpoint_plugins
    if getattr(original, "__moka__", False):
        return

    def attach_endpoint_plugins(app, supported_tasks):
        original(app, supported_tasks)
        app.include_router(build_router())
        app.add_middleware(AdminGate)

    attach_endpoint_plugins.__moka__ = True  # type: ignore[attr-defined]
    app_module.attach_endpoint_plugins = attach_endpoint_plugins
