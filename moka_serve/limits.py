"""Engine-start limits of the MoKA banks, read from the environment (no vLLM import).

Shared by the plugin's layers (which size their banks with them) and ``moka-serve``'s start-up
precheck (which leaves out folders the engine would refuse), so both give the same verdict.

* ``MOKA_MAX_COMPONENTS`` (default 4): Kronecker components per adapted module (per output
  slice of a fused layer: q, k and v of ``qkv_proj`` each get this many).
* ``MOKA_MAX_FACTOR_NUMEL`` (default 4096): elements of one A or B factor.
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
