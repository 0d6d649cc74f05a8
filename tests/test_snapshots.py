"""The worker's adapter snapshots (``moka_serve.plugin.snapshots``) and the rejection log filter,
on real folders and real log records (no engine: the engine tests cover reload and unload)."""

from __future__ import annotations

import logging
import shutil

import pytest

from moka_serve.plugin import snapshots
from moka_serve.plugin.snapshots import AdapterSnapshots


def _folder(tmp_path, name="ad", size=1000):
    f = tmp_path / name
    f.mkdir()
    (f / "adapter_config.json").write_text('{"peft_type": "MOKA"}')
    (f / "adapter_model.safetensors").write_bytes(b"x" * size)
    return f


def test_snapshot_is_a_copy_dropped_on_unload(tmp_path, monkeypatch):
    monkeypatch.setenv(snapshots.ENV_DIR, str(tmp_path / "store"))
    store = AdapterSnapshots()
    f = _folder(tmp_path)
    snap = store.take((7, str(f)), str(f))
    assert snap.parent.parent == tmp_path / "store"
    (f / "adapter_model.safetensors").write_bytes(b"changed")
    assert store.get((7, str(f))) == snap
    assert (snap / "adapter_model.safetensors").read_bytes() == b"x" * 1000
    assert store.stored_bytes == 1000 + len('{"peft_type": "MOKA"}')
    store.drop_id(7)
    assert store.get((7, str(f))) is None and not snap.exists() and store.stored_bytes == 0


def test_a_retired_snapshot_lives_until_a_step_without_its_adapter(tmp_path, monkeypatch):
    """An unload retires the adapter's snapshot: requests still running with it may load it
    again; the first step (``sweep``) whose adapters do not include it drops it."""
    monkeypatch.setenv(snapshots.ENV_DIR, str(tmp_path / "store"))
    store = AdapterSnapshots()
    f, g = _folder(tmp_path), _folder(tmp_path, "other")
    snap = store.take((7, str(f)), str(f))
    other = store.take((8, str(g)), str(g))
    store.retire_id(9)  # nothing of it stored: nothing to retire
    assert not store.is_retired(9)
    store.retire_id(7)
    assert store.is_retired(7) and not store.is_retired(8)
    store.sweep({7, 8})  # a step still running adapter 7
    assert store.get((7, str(f))) == snap
    store.sweep({8})
    assert store.get((7, str(f))) is None and not snap.exists() and not store.is_retired(7)
    assert store.get((8, str(g))) == other  # never retired: a sweep leaves it
    store.retire_id(8)
    store.drop_id(8)
    assert not store.is_retired(8) and store.stored_bytes == 0


def test_full_store_refuses_a_new_adapter_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(snapshots.ENV_DIR, str(tmp_path / "store"))
    monkeypatch.setenv(snapshots.ENV_MAX_GIB, str(2500 / 2**30))
    store = AdapterSnapshots()
    a, b = _folder(tmp_path, "a"), _folder(tmp_path, "b", size=2000)
    store.take((1, str(a)), str(a))
    with pytest.raises(ValueError, match="snapshot store is full.*MOKA_SNAPSHOT_MAX_GIB"):
        store.take((2, str(b)), str(b))
    assert store.get((2, str(b))) is None
    store.drop_id(1)  # an unload makes room
    assert store.take((2, str(b)), str(b)).is_dir()


def test_folder_rewritten_during_the_copy_is_refused(tmp_path, monkeypatch):
    """A writer re-saving the folder while it is copied: the copy could mix two versions."""
    store = AdapterSnapshots()
    f = _folder(tmp_path)
    copy = shutil.copyfile

    def copy_while_rewritten(src, dst):
        out = copy(src, dst)
        (f / "adapter_model.safetensors").write_bytes(b"y" * 500)  # another writer's save
        return out

    monkeypatch.setattr(snapshots.shutil, "copyfile", copy_while_rewritten)
    with pytest.raises(ValueError, match="changed while it was being read"):
        store.take((3, str(f)), str(f))
    assert store.get((3, str(f))) is None and store.stored_bytes == 0


def test_snapshot_holds_the_files_loaders_read_and_ignores_the_rest(tmp_path, monkeypatch):
    """moka-train's logs and predictions beside the adapter are not copied, and a log still
    being written while the adapter loads does not refuse it."""
    monkeypatch.setenv(snapshots.ENV_DIR, str(tmp_path / "store"))
    store = AdapterSnapshots()
    f = _folder(tmp_path)
    (f / "train_log.jsonl").write_text("{}\n" * 5000)
    (f / "adapter_model.bin").write_bytes(b"b" * 30)  # vLLM's LoRA loader reads this one too
    copy = shutil.copyfile

    def copy_while_logging(src, dst):
        out = copy(src, dst)
        with open(f / "train_log.jsonl", "a") as log:
            log.write('{"step": 1}\n')
        return out

    monkeypatch.setattr(snapshots.shutil, "copyfile", copy_while_logging)
    snap = store.take((5, str(f)), str(f))
    assert sorted(p.name for p in snap.iterdir()) == [
        "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"
    ]  # fmt: skip
    assert store.stored_bytes == 1000 + 30 + len('{"peft_type": "MOKA"}')


def test_unreadable_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot snapshot the adapter folder"):
        AdapterSnapshots().take((4, str(tmp_path / "gone")), str(tmp_path / "gone"))


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        import sys

        return logging.LogRecord("vllm.v1.engine.core", logging.ERROR, __file__, 1,
                                 "Invocation of %s method failed", ("add_lora",),
                                 sys.exc_info())  # fmt: skip


def test_rejections_are_logged_as_one_line_other_errors_keep_their_traceback():
    pytest.importorskip("vllm")
    from vllm.exceptions import LoRAAdapterNotFoundError

    from moka_serve.plugin.logs import RejectedAdapterFilter

    f = RejectedAdapterFilter()
    wrapped = RuntimeError(
        "Worker failed with error 'Invalid adapter 'x': weights truncated', please check the "
        "stack trace above for the root cause"
    )
    for exc, reason in [
        (ValueError("Invalid adapter 'x': tensor 'A' has non-finite values"),
         "Invalid adapter 'x': tensor 'A' has non-finite values"),
        (wrapped, "Invalid adapter 'x': weights truncated"),
        (LoRAAdapterNotFoundError("x", "/gone"), "Loading lora x failed: No adapter found for /gone"),
    ]:  # fmt: skip
        r = _record(exc)
        assert f.filter(r)
        assert r.getMessage() == f"adapter rejected: {reason}"
        assert r.exc_info is None and r.levelno == logging.WARNING
    other = _record(RuntimeError("CUDA error: an illegal memory access"))
    assert f.filter(other)
    assert other.exc_info is not None and other.levelno == logging.ERROR
