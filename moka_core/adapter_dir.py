"""Which sub-folders of an adapters folder may be served, and under which names (no vLLM here).

One rule for ``moka-serve --adapters DIR`` (start-up) and the plugin's resolver (first request):
a name is one path component (no separators, no leading dot, at most 255 bytes), the folder
holds an ``adapter_config.json``, and the folder and its adapter files resolve inside ``DIR``:
a symlink pointing elsewhere is not followed unless ``MOKA_ALLOW_SYMLINKS=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

from moka_core import settings

ENV_ALLOW_SYMLINKS = "MOKA_ALLOW_SYMLINKS"
NAME_MAX_BYTES = 255  # NAME_MAX of Linux file systems


def valid_adapter_name(name: str) -> bool:
    """Whether ``name`` can be a folder directly under the adapters folder."""
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
        and len(name.encode("utf-8", "surrogatepass")) <= NAME_MAX_BYTES
    )


def adapter_folder(root: Path, name: str) -> Path | None:
    """``root/name`` when it is an adapter folder the server may serve, else None.

    ``root`` must be resolved. Never raises: a name too long for the file system or a dangling
    link is simply no adapter.
    """
    if not valid_adapter_name(name):
        return None
    folder = root / name
    try:
        if not (folder / "adapter_config.json").is_file():
            return None
        if not stays_inside(root, folder) and not settings.get(ENV_ALLOW_SYMLINKS):
            return None
    except (OSError, ValueError):
        return None
    return folder


def adapter_folders(root: Path) -> dict[str, Path]:
    """Every folder of ``root`` that :func:`adapter_folder` accepts, by name (sorted)."""
    root = root.resolve()
    found = {}
    for name in sorted(os.listdir(root)):
        folder = adapter_folder(root, name)
        if folder is not None:
            found[name] = folder
    return found


def stays_inside(root: Path, folder: Path) -> bool:
    """Whether ``folder`` and the adapter files in it resolve to paths under ``root``."""
    paths = [folder] + [folder / f for f in ("adapter_config.json", "adapter_model.safetensors")]
    return all(p.resolve().is_relative_to(root) for p in paths)


def folder_signature(folder: Path) -> tuple:
    """Names, sizes and modification times of a folder's top-level files (no file is read):
    what caches of per-folder verdicts are keyed by, so any change to the folder invalidates."""
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file():
                st = e.stat()
                entries.append((e.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))
