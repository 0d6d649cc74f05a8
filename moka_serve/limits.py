"""Engine-start limits of the MoKA banks, read from the environment (no vLLM import).

Shared by the plugin's layers (which size their banks with them) and ``moka-serve``'s start-up
precheck (which leaves out folders the engine would refuse), so both give the same verdict.

* ``MOKA_MAX_COMPONENTS`` (default 4): Kronecker components per adapted module (per output
  slice of a fused layer: q, k and v of ``qkv_proj`` each get this many).
* ``MOKA_MAX_FACTOR_NUMEL`` (default 4096): elements of one A or B factor.
* ``MOKA_SLOT_NUMEL`` (default: room for every slot full at those caps): factor elements the
  pool of one layer holds per slot, on average: the pool of a layer is ``max_loras`` times this.
  One integer for every layer, or ``kind=N`` pairs by vLLM module (``qkv_proj=9216,o_proj=0``;
  kinds not named keep the default). Adapters that would overfill a pool are refused at load
  time with their sizes (``moka_kernels.bank``, admission).
* ``MOKA_ONLY`` (``1`` to turn on; ``moka-serve --moka-only`` and a folder of MoKA adapters set
  it): the engine serves MoKA adapters only. vLLM's per-slot LoRA buffers become read-only views
  of one zero element (no memory per slot), vLLM's LoRA ops never run, and LoRA adapters are
  refused when they are loaded.
"""

from __future__ import annotations

import os

DEFAULT_MAX_COMPONENTS = 4
DEFAULT_MAX_FACTOR_NUMEL = 4096


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={value} must be positive")
    return value


def bank_limits() -> tuple[int, int]:
    """``(max components per module slice, max factor numel)`` from the environment."""
    return (
        _env_int("MOKA_MAX_COMPONENTS", DEFAULT_MAX_COMPONENTS),
        _env_int("MOKA_MAX_FACTOR_NUMEL", DEFAULT_MAX_FACTOR_NUMEL),
    )


def moka_only_engine() -> bool:
    """Whether ``MOKA_ONLY`` asks for an engine that serves MoKA adapters only."""
    raw = os.environ.get("MOKA_ONLY", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"MOKA_ONLY={raw!r}: use 1 or 0")


def slot_numel(kind: str, default: int) -> int:
    """Pool elements per slot for layers of ``kind`` (e.g. ``qkv_proj``) from
    ``MOKA_SLOT_NUMEL``, or ``default``."""
    raw = os.environ.get("MOKA_SLOT_NUMEL", "").strip()
    if not raw:
        return default
    if raw.isdigit():
        return int(raw)
    sizes = {}
    for part in raw.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"MOKA_SLOT_NUMEL={raw!r}: use N or kind=N,kind=N (N >= 0)")
        sizes[name.strip()] = int(value)
    return sizes.get(kind, default)
