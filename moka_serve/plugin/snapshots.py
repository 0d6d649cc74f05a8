"""Snapshots of adapter folders: what was validated is what every later reload reads.

vLLM keeps at most ``max_cpu_loras`` adapters in its CPU cache; an evicted adapter is loaded
again from its folder when next requested, inside the engine step, where an exception kills the
engine core. A folder changed on disk in between (re-saved, truncated, deleted) used to take the
whole server down. So the worker copies the files its loaders read (:data:`LOADED_FILES`) into a
folder of its own the first time it loads an adapter, validates the copy, and every later load
of the same adapter (same id, same path) reads the copy: a change on disk takes effect only
through an explicit reload (unload + load, a new name, or vLLM's ``load_inplace``). The rest of
a folder (``moka-train``'s logs and predictions, a README) is neither copied nor watched: it was
a third of a cold load's copying, and a log still being written refused the load.

The copies live in a temporary folder of the worker process (under ``MOKA_SNAPSHOT_DIR`` if set),
removed when the process exits and after the adapter is unloaded: an unload (vLLM's
``/v1/unload_lora_adapter``) lets requests already running finish, and vLLM loads their adapter
again inside the next step, so an unloaded adapter's copy is kept (*retired*) until the first
step that runs no request of it (:meth:`AdapterSnapshots.sweep`); until then those requests read
what they started with, whatever became of the folder. An explicit load of a retired adapter id
reads the folder again. A copy is checked against those
files' names, sizes and modification times before and after it is taken, so a folder
re-saved during the copy is refused ("changed while being read") rather than half-read. The
store is capped (``MOKA_SNAPSHOT_MAX_GIB``, default 20): a first load that would exceed it is
refused with a clear error, at load time, never in the middle of serving.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from moka_core import settings
from moka_core.adapter_dir import folder_signature
from moka_core.adapter_format import CONFIG_NAME, WEIGHTS_NAME

# Top-level files of an adapter folder bigger than this are not adapter files (the format's own
# limit for MoKA weights is far lower); they are not copied, and a load that needs one fails.
MAX_FILE_BYTES = 8 << 30
# What the worker's loaders open: the MoKA loader (``moka_core.adapter_format``) and vLLM
# 0.32.0's ``LoRAModel.from_local_checkpoint`` / ``PEFTHelper.from_local_dir`` (the config and
# the first weights file of safetensors, bin, pt that exists).
LOADED_FILES = frozenset((CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin", "adapter_model.pt"))
ENV_DIR = "MOKA_SNAPSHOT_DIR"
ENV_MAX_GIB = "MOKA_SNAPSHOT_MAX_GIB"


def max_store_bytes() -> int:
    return int(settings.get(ENV_MAX_GIB) * 2**30)


class AdapterSnapshots:
    """``(adapter id, folder) -> snapshot folder`` for one worker process."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._paths: dict[tuple[int, str], Path] = {}
        self._bytes: dict[tuple[int, str], int] = {}
        self._count = 0
        self._retired: set[int] = set()

    def _dir(self) -> Path:
        if self._root is None:
            parent = settings.get(ENV_DIR)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._root = Path(tempfile.mkdtemp(prefix="moka-adapter-snapshots-", dir=parent))
            atexit.register(shutil.rmtree, self._root, True)
        return self._root

    @property
    def stored_bytes(self) -> int:
        return sum(self._bytes.values())

    def get(self, key: tuple[int, str]) -> Path | None:
        snap = self._paths.get(key)
        return snap if snap is not None and snap.is_dir() else None

    def take(self, key: tuple[int, str], folder: str) -> Path:
        """Copy the :data:`LOADED_FILES` of ``folder`` that exist; ``ValueError`` if it cannot be
        read, they change while they are read, or they would overfill the store."""
        self._count += 1
        snap = self._dir() / f"{key[0]}-{self._count}"
        try:
            before = _loaded_files(folder)
            files = [(n, size) for n, size, _ in before if size <= MAX_FILE_BYTES]
            size = sum(s for _, s in files)
            cap = max_store_bytes()
            if self.stored_bytes + size > cap:
                raise ValueError(
                    f"the adapter snapshot store is full ({self.stored_bytes / 2**30:.2f} GiB of "
                    f"{cap / 2**30:.2f} GiB, {ENV_MAX_GIB}); unload adapters or raise the cap"
                )
            snap.mkdir()
            for name, _ in files:
                shutil.copyfile(Path(folder) / name, snap / name)
            if _loaded_files(folder) != before:
                raise ValueError(
                    f"the adapter folder {folder!r} changed while it was being read; try again "
                    "once it is written"
                )
        except (OSError, ValueError) as e:
            shutil.rmtree(snap, ignore_errors=True)
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"cannot snapshot the adapter folder {folder!r}: {e}") from None
        self._paths[key] = snap
        self._bytes[key] = size
        return snap

    def drop(self, key: tuple[int, str]) -> None:
        snap = self._paths.pop(key, None)
        self._bytes.pop(key, None)
        if snap is not None:
            shutil.rmtree(snap, ignore_errors=True)

    def drop_id(self, adapter_id: int) -> None:
        """Drop every snapshot of adapter ``adapter_id``."""
        self._retired.discard(adapter_id)
        for key in [k for k in self._paths if k[0] == adapter_id]:
            self.drop(key)

    def retire_id(self, adapter_id: int) -> None:
        """Adapter ``adapter_id`` was unloaded: its snapshots stay for the requests still
        running with it, until :meth:`sweep` finds a step without them."""
        if any(k[0] == adapter_id for k in self._paths):
            self._retired.add(adapter_id)

    def is_retired(self, adapter_id: int) -> bool:
        return adapter_id in self._retired

    def sweep(self, in_use: set[int]) -> None:
        """Drop the retired snapshots of every adapter id not in ``in_use`` (a step's)."""
        for adapter_id in self._retired - in_use:
            self.drop_id(adapter_id)


def _loaded_files(folder: str) -> tuple:
    """``folder_signature`` (names, sizes, modification times) of the files loaders read."""
    return tuple(f for f in folder_signature(Path(folder)) if f[0] in LOADED_FILES)


SNAPSHOTS = AdapterSnapshots()
