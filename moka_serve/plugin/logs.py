"""One log line, not three tracebacks, for an adapter the loader rejected.

A rejected adapter is an answer (400/404 to its client), not a server fault, but vLLM logs every
failed worker RPC with ``logger.exception`` twice (the worker, then the engine core's utility
call), about 60 lines per bad request. This filter on those two loggers turns records whose
exception is a rejection (the loader's :data:`~moka_serve.plugin.worker_manager.INVALID_ADAPTER`
marker, or vLLM's "not found" for a missing folder) into one warning line with the reason;
every other exception keeps its traceback.
"""

from __future__ import annotations

import logging

# vLLM's loggers of failed worker RPCs and utility calls (``init_logger(__name__)``).
LOGGERS = ("vllm.v1.executor.multiproc_executor", "vllm.v1.engine.core")
# Where a rejection's reason starts: the loader's marker, vLLM's LoRAAdapterNotFoundError text.
MARKERS = ("Invalid adapter", "Loading lora ")
NOT_FOUND = "No adapter found for"


def rejection_reason(exc: BaseException) -> str | None:
    """The reason, from its marker on, when ``exc`` (or the RPC failure wrapping it) is an
    adapter rejection; None for any other exception."""
    text = str(exc)
    for marker in MARKERS:
        at = text.find(marker)
        if at >= 0 and (marker != "Loading lora " or NOT_FOUND in text):
            reason = text[at:].splitlines()[0]
            return reason.split("', please check the stack trace")[0]  # the RPC's wrapping
    return None


class RejectedAdapterFilter(logging.Filter):
    """Rewrites rejection records in place: WARNING, the reason, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        reason = rejection_reason(exc) if exc is not None else None
        if reason is not None:
            record.msg, record.args = "adapter rejected: %s", (reason,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install() -> None:
    """Attach the filter to vLLM's RPC loggers (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RejectedAdapterFilter) for f in logger.filters):
            logger.addFilter(RejectedAdapterFilter())
