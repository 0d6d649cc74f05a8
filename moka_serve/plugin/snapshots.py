"""Snapshots of adapter folders: what was validated is what every later reload reads.

vLLM keeps at most ``max_cpu_loras`` adapters in its CPU cache; an evicted adapter is loaded
again from its folder when next requested, inside the engine step, where an exception kills the
engine core. A folder changed on disk in between (re-saved, truncated, deleted) used to take the
whole server down. So the worker copies an adapter folder's files into a folder of its own the
first time it loads it, validates the copy, and every later load of the same adapter (same id,
same path) reads the copy: a change on disk takes effect only through an explicit reload (unload
+ load, a new name, or vLLM's ``load_inplace``). The copies live in a temporary folder of the
worker process, removed when it exits.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

# Top-level files of an adapter folder bigger than this are not adapter files (the format's own
# limit for MoKA weights is far lower); they are not copied, and a load that needs one fails.
MAX_FILE_BYTES = 8 << 30


class AdapterSnapshots:
    """``(adapter id, folder) -> snapshot folder`` for one worker process."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._paths: dict[tuple[int, str], Path] = {}
        self._count = 0

    def _dir(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="moka-adapter-snapshots-"))
            atexit.register(shutil.rmtree, self._root, True)
        return self._root

    def get(self, key: tuple[int, str]) -> Path | None:
        snap = self._paths.get(key)
        return snap if snap is not None and snap.is_dir() else None

    def take(self, key: tuple[int, str], folder: str) -> Path:
        """Copy the regular top-level files of ``folder``; ``ValueError`` if it cannot be read."""
        self._count += 1
        snap = self._dir() / f"{key[0]}-{self._count}"
        try:
            snap.mkdir()
            for f in sorted(Path(folder).iterdir()):
                if f.is_file() and f.stat().st_size <= MAX_FILE_BYTES:
                    shutil.copyfile(f, snap / f.name)
        except OSError as e:
            shutil.rmtree(snap, ignore_errors=True)
            raise ValueError(f"cannot read the adapter folder {folder!r}: {e}") from None
        self._paths[key] = snap
        return snap

    def drop(self, key: tuple[int, str]) -> None:
        snap = self._paths.pop(key, None)
        if snap is not None:
            shutil.rmtree(snap, ignore_errors=True)


SNAPSHOTS = AdapterSnapshots()
