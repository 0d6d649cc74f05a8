"""One table of ``MOKA_*`` settings (``moka_core/settings.py``): its parsers, and the docs table
that must list exactly those variables with the same defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moka_core import limits, settings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "serving.md"
SOURCES = [Path(__file__).resolve().parent.parent / p for p in ("moka_serve", "moka_trainer")]


def test_the_docs_table_lists_every_setting_with_its_default():
    rows = re.findall(r"^\| `(MOKA_[A-Z_]+)` \| ([^|]+) \|", DOCS.read_text(), re.MULTILINE)
    documented = {name: default.strip() for name, default in rows}
    assert set(documented) == set(settings.SETTINGS)
    for name, setting in settings.SETTINGS.items():
        assert documented[name] == setting.documented_default, name


def test_code_reads_settings_only_through_the_table():
    """No ``os.environ`` read of a MOKA_* variable outside ``settings.py`` (moka-serve still
    writes them into the server's environment, which is not a read)."""
    reads = re.compile(r"(environ\.get|getenv)\(\s*[\"']MOKA_")
    offenders = [
        str(path)
        for root in SOURCES
        for path in root.rglob("*.py")
        if path.name != "settings.py" and reads.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_switches_on(monkeypatch, raw):
    monkeypatch.setenv("MOKA_ONLY", raw)
    assert limits.moka_only_engine() is True


@pytest.mark.parametrize("raw", ["0", "false", "no", "off", "", "  "])
def test_switches_off(monkeypatch, raw):
    monkeypatch.setenv("MOKA_ONLY", raw)
    assert limits.moka_only_engine() is False


def test_defaults_and_errors_name_the_variable(monkeypatch):
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert settings.get("MOKA_COMPILE") is True and settings.get("MOKA_ALLOW_SYMLINKS") is False
    assert limits.bank_limits() == (4, 4096)
    assert settings.get("MOKA_SNAPSHOT_MAX_GIB") == 20.0 and settings.get("MOKA_CACHE") is None
    for name, raw in (
        ("MOKA_COMPILE", "maybe"),
        ("MOKA_MAX_COMPONENTS", "zero"),
        ("MOKA_MAX_FACTOR_NUMEL", "-3"),
        ("MOKA_SNAPSHOT_MAX_GIB", "lots"),
        ("MOKA_SLOT_NUMEL", "qkv_proj"),
    ):
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValueError, match=f"{name}="):
            settings.get(name)
    monkeypatch.setenv("MOKA_SLOT_NUMEL", "qkv_proj=9216,o_proj=0")
    assert limits.slot_numel("qkv_proj", 5) == 9216 and limits.slot_numel("o_proj", 5) == 0
    assert limits.slot_numel("down_proj", 5) == 5
    assert settings.get("MOKA_ADMIN_KEY", {"MOKA_ADMIN_KEY": " k "}) == "k"
