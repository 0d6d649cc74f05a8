"""Engine-start limits of the MoKA banks, read from the environment (no vLLM import).

Shared by the plugin's layers (which size their banks with them) and ``moka-serve``'s start-up
precheck (which leaves out folders the engine would refuse), so both give the same verdict.

* ``MOKA_MAX_COMPONENTS`` (default 4): Kronecker components per adapted module (per output
  slice of a fused layer: q, k and v of ``qkv_proj`` each get this many). It bounds the
  kernels' entries, so a module's rank-1 components, applied as one rank-r pair, count as one.
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

from collections.abc import Iterable, Sequence

from moka_core import settings
from moka_kernels.bank import rank_one_shape

DEFAULT_MAX_COMPONENTS = settings.SETTINGS["MOKA_MAX_COMPONENTS"].default
DEFAULT_MAX_FACTOR_NUMEL = settings.SETTINGS["MOKA_MAX_FACTOR_NUMEL"].default


def kernel_entries(shapes: Iterable[Sequence[int]], identity_a: bool = False) -> int:
    """Entries the kernels hold for one module's components ``(m1, n1, m2, n2)``: its rank-1
    components (``(m, 1, 1, n)`` or ``(1, n, m, 1)``, never with an identity A) together are
    one (``moka_kernels.bank.group_rank_one``); what ``MOKA_MAX_COMPONENTS`` bounds."""
    shapes = [tuple(s) for s in shapes]
    rank_one = 0 if identity_a else sum(rank_one_shape(*s) for s in shapes)
    return len(shapes) - rank_one + (1 if rank_one else 0)


def bank_limits() -> tuple[int, int]:
    """``(max components per module slice, max factor numel)`` from the environment."""
    return settings.get("MOKA_MAX_COMPONENTS"), settings.get("MOKA_MAX_FACTOR_NUMEL")


def moka_only_engine() -> bool:
    """Whether ``MOKA_ONLY`` asks for an engine that serves MoKA adapters only."""
    return settings.get("MOKA_ONLY")


def slot_numel(kind: str, default: int) -> int:
    """Pool elements per slot for layers of ``kind`` (e.g. ``qkv_proj``) from
    ``MOKA_SLOT_NUMEL``, or ``default``."""
    value = settings.get("MOKA_SLOT_NUMEL")
    if value is None:
        return default
    if isinstance(value, int):
        return value
    return value.get(kind, default)
