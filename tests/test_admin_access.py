"""The admin rules without a server (``moka_core.admin_access``, the CLI's admin options and the
load-time bound on an update's size); the HTTP tests run them against the real server."""

from __future__ import annotations

import os

import pytest
import torch

from moka_core import admin_access
from moka_core.adapter_check import update_size_problem
from moka_serve import cli


def test_paths_load_only_from_inside_the_roots(tmp_path, monkeypatch):
    root, extra, outside = tmp_path / "ad", tmp_path / "extra", tmp_path / "outside"
    for d in (root / "a", extra / "b", outside / "c"):
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
    (root / "link").symlink_to(outside / "c")
    monkeypatch.setenv("MOKA_ADAPTER_DIR", str(root))
    monkeypatch.delenv("MOKA_ADMIN_ROOTS", raising=False)
    assert admin_access.path_problem(str(root / "a")) is None
    for bad in (extra / "b", outside / "c", root / "link", root / ".." / "outside" / "c"):
        assert "outside the folders" in admin_access.path_problem(str(bad)), bad
    monkeypatch.setenv("MOKA_ADMIN_ROOTS", os.pathsep.join([str(extra), str(tmp_path / "x")]))
    assert admin_access.path_problem(str(extra / "b")) is None
    assert admin_access.path_problem(str(outside / "c")) is not None
    monkeypatch.delenv("MOKA_ADAPTER_DIR")
    monkeypatch.delenv("MOKA_ADMIN_ROOTS")
    assert "has none" in admin_access.path_problem(str(root / "a"))


def test_admin_key_and_admin_paths(monkeypatch):
    monkeypatch.delenv("MOKA_ADMIN_KEY", raising=False)
    assert admin_access.admin_key() is None and not admin_access.is_admin("anything")
    monkeypatch.setenv("MOKA_ADMIN_KEY", "s3cret")
    assert admin_access.is_admin("s3cret")
    assert not admin_access.is_admin("s3cret ") and not admin_access.is_admin(None)
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/adapters/x"):
        assert admin_access.is_admin_path(path), path
    for path in ("/v1/completions", "/v1/models", "/v1/moka/adapters", "/adaptersx"):
        assert not admin_access.is_admin_path(path), path


def _cmd(argv, env):
    args, rest = cli.build_parser().parse_known_args(argv)
    return cli.build_command(args, rest, env=env), args, rest


def test_cli_admin_key_goes_to_the_environment_never_the_command_line(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    argv = ["--base", "/m", "--plain", "--admin-key", "k1", "--admin-root", str(extra)]
    (cmd, env), _, _ = _cmd(argv, {})
    assert env["MOKA_ADMIN_KEY"] == "k1" and "k1" not in cmd
    assert env["MOKA_ADMIN_ROOTS"] == str(extra.resolve())
    with pytest.raises(SystemExit, match="must differ from --api-key"):
        _cmd(["--base", "/m", "--admin-key", "k1", "--api-key", "k1"], {})
    with pytest.raises(SystemExit, match="must differ from --api-key"):
        _cmd(["--base", "/m"], {"MOKA_ADMIN_KEY": "k2", "VLLM_API_KEY": "k2"})
    with pytest.raises(SystemExit, match="is not a folder"):
        _cmd(["--base", "/m", "--admin-root", str(tmp_path / "nope")], {})


def test_start_up_says_which_surfaces_are_open(tmp_path, capsys):
    ad = tmp_path / "ad"
    ad.mkdir()
    (cmd, env), args, rest = _cmd(["--base", "/m", "--adapters", str(ad)], {})
    off = cli.surfaces(env, rest, args.plain)
    assert off[0].startswith("moka-serve: open to every client: inference")
    assert "without server paths" in off[0] and str(ad.resolve()) in off[0]
    assert off[1].endswith("off (no --admin-key)")
    argv = ["--base", "/m", "--adapters", str(ad), "--admin-key", "k", "--api-key", "i"]
    (cmd, env), args, rest = _cmd(argv, {})
    on = cli.surfaces(env, rest, args.plain)
    assert on[0].startswith("moka-serve: open to clients with the --api-key")
    assert "X-Moka-Admin-Key" in on[1] and f"loading only from {ad.resolve()}" in on[1]
    assert (
        cli.main(["--base", "/m", "--adapters", str(ad), "--admin-key", "zz9", "--print-command"])
        == 0
    )
    out, err = capsys.readouterr()
    assert "zz9" not in out + err and "MOKA_ADMIN_KEY=<the admin key>" in out
    assert "adapter administration" in err


def test_update_size_bound():
    torch.manual_seed(0)
    a, b = torch.randn(16, 16) * 0.1, torch.randn(16, 16) * 0.1
    assert update_size_problem("m", [(a, b)]) is None
    assert update_size_problem("m", [(None, b)]) is None
    problem = update_size_problem("m", [(a * 1e30, b)])
    assert "check the adapter's scaling" in problem and "float32" in problem
    assert update_size_problem("m", [(a * 1e3, b)], torch.float16) is not None  # sqrt(65504)=256
    assert update_size_problem("m", [(a, b * float("nan"))]) is not None


def test_start_up_leaves_out_an_adapter_whose_update_would_overflow(tmp_path, capsys):
    from vllm_helpers import TINY_DIMS, TINY_LAYERS, random_moka, write_moka

    from moka_core.base_models import tiny_llama_dir

    ad = tmp_path / "ad"
    for name, scaling in (("fine", 2.0), ("huge", 1e30)):
        adapter = random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=1, scaling=scaling,
                              dims=TINY_DIMS, layers=TINY_LAYERS)  # fmt: skip
        write_moka(ad / name, adapter)
    (cmd, _), _, _ = _cmd(["--base", str(tiny_llama_dir()), "--adapters", str(ad)], {})
    mods = cmd[cmd.index("--lora-modules") + 1 :]
    assert [m.split("=")[0] for m in mods if "=" in m] == ["fine"]
    err = capsys.readouterr().err
    assert "not serving adapter 'huge'" in err and "check the adapter's scaling" in err, err
