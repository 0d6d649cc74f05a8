"""Every ``MOKA_*`` environment variable in one table: name, default, parser and meaning.

vLLM's ``envs.py`` habit: code reads a setting with :func:`get` (never ``os.environ`` directly),
so each variable has one parser and one default, and ``docs/serving.md``'s table of settings is
checked against :data:`SETTINGS` by ``tests/test_settings.py``. Switches share one rule
(:func:`parse_flag`): ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (any
case), empty means the default, anything else is an error that names the variable.

No vLLM and no transformers here: the serve CLI, the plugin, the trainer and the benchmarks all
read it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError("use 1 or 0 (true/false, yes/no, on/off)")


def parse_positive_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("is not an integer") from None
    if value < 1:
        raise ValueError("must be positive")
    return value


def parse_positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("is not a number") from None
    if not value > 0:
        raise ValueError("must be positive")
    return value


def parse_text(raw: str) -> str:
    return raw.strip()


def parse_slot_numel(raw: str) -> dict[str, int] | int:
    """``N`` (every layer) or ``kind=N,kind=N`` (by vLLM module), N >= 0."""
    raw = raw.strip()
    if raw.isdigit():
        return int(raw)
    sizes = {}
    for part in raw.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError("use N or kind=N,kind=N (N >= 0)")
        sizes[name.strip()] = int(value)
    return sizes


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any  # the value when unset or empty (None: unset)
    parse: Callable[[str], Any]
    documented_default: str  # the default as docs/serving.md's table states it
    doc: str


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("MOKA_MAX_COMPONENTS", 4, parse_positive_int, "4",
                "Kronecker components per adapted module (per slice of a fused layer); "
                "its rank-1 components count as one"),
        Setting("MOKA_MAX_FACTOR_NUMEL", 4096, parse_positive_int, "4096",
                "elements of one A or B factor"),
        Setting("MOKA_SLOT_NUMEL", None, parse_slot_numel,
                "room for every slot full at the limits above",
                "MoKA pool elements per slot and layer"),
        Setting("MOKA_ONLY", False, parse_flag, "unset", "an engine for MoKA adapters only"),
        Setting("MOKA_ADAPTER_DIR", None, parse_text, "unset",
                "folder the resolver serves by name"),
        Setting("MOKA_ALLOW_SYMLINKS", False, parse_flag, "unset",
                "serve adapter folders that link out of the adapters folder"),
        Setting("MOKA_ADMIN_KEY", None, parse_text, "unset", "the admin credential"),
        Setting("MOKA_ADMIN_ROOTS", None, parse_text, "unset",
                "more folders admin clients may load adapters from"),
        Setting("MOKA_CACHE", None, parse_text, "`~/.cache/moka-serve`",
                "where the base models are materialised and the CPU kernel is built"),
        Setting("MOKA_DISABLE_PLUGIN", False, parse_flag, "unset",
                "load vLLM without any MoKA patch"),
        Setting("MOKA_DISABLE_CPU_LORA_FIX", False, parse_flag, "unset",
                "keep vLLM's CPU LoRA bug"),
        Setting("MOKA_COMPILE", True, parse_flag, "`1`",
                "keep adapter-enabled CPU engines compiled"),
        Setting("MOKA_CPU_KERNEL", True, parse_flag, "`1`",
                "build and use the C++ kernel for CPU batches"),
        Setting("MOKA_CPU_LORA", True, parse_flag, "`1`",
                "serve LoRA adapters through the MoKA op on CPU"),
        Setting("MOKA_SNAPSHOT_DIR", None, parse_text, "the system's temp folder",
                "where workers keep snapshots of the adapter folders they loaded"),
        Setting("MOKA_SNAPSHOT_MAX_GIB", 20.0, parse_positive_float, "20",
                "cap on one worker's snapshots, GiB"),
    )
}  # fmt: skip


def get(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The value of setting ``name`` in ``env`` (default: the process environment), parsed;
    its default when unset or empty. ``ValueError`` naming the variable when it cannot be read."""
    setting = SETTINGS[name]
    raw = (os.environ if env is None else env).get(name, "")
    if not raw.strip():
        return setting.default
    try:
        return setting.parse(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r}: {e}") from None
