"""Plugin pieces that need vLLM importable but no engine: checks, the CPU-op fix, the resolver."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")


def test_version_pin_message():
    from moka_serve.plugin import checks

    checks.check_version("0.32.0")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.33\.0 is installed.*pinned to vLLM 0\.32\.0"):
        checks.check_version("0.33.0")


def test_internals_check_passes_and_names_a_changed_signature(monkeypatch):
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from moka_serve.plugin import checks

    checks.check_internals()  # before or after the plugin patched vLLM

    def changed(self, request, extra):  # a future vLLM renaming the parameter
        pass

    monkeypatch.setattr(LRUCacheWorkerLoRAManager, "_load_adapter", changed)
    with pytest.raises(RuntimeError, match=r"LRUCacheWorkerLoRAManager\._load_adapter changed"):
        checks.check_internals()


def test_cpu_fix_zeroes_no_adapter_tokens():
    """Fails without the fix: vLLM's op gives index -1 the last slot's weights."""
    from vllm.lora.ops.torch_ops import lora_ops

    from moka_serve.plugin import cpu_fix

    original = cpu_fix.ORIGINALS.get("bgmv_shrink", lora_ops.bgmv_shrink)
    fixed = cpu_fix.fixed_ops()
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    a = torch.randn(2, 1, 4, 8)  # 2 slots, rank 4
    idx = torch.tensor([0, -1, 1])
    broken = torch.zeros(3, 4)
    original(x, a, broken, idx, 1.0)
    assert broken[1].abs().sum() > 0  # the bug: row 1 got slot 1's LoRA
    out = torch.zeros(3, 4)
    fixed["bgmv_shrink"](x, a, out, idx, 1.0)
    assert torch.equal(out[1], torch.zeros(4))
    assert torch.allclose(out[[0, 2]], broken[[0, 2]])

    b = torch.randn(2, 1, 6, 4)
    y = torch.zeros(3, 6)
    fixed["bgmv_expand"](out, b, y, idx, True)
    assert torch.equal(y[1], torch.zeros(6))
    y2 = torch.zeros(3, 10)
    fixed["bgmv_expand_slice"](out, b, y2, idx, 2, 6, True)
    assert torch.equal(y2[1], torch.zeros(10))
    assert torch.allclose(y2[:, 2:8], y)


def test_resolver_finds_adapter_folders_and_stays_inside(tmp_path, monkeypatch):
    from moka_serve.plugin.resolver import MokaDirResolver

    root, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    for folder, peft_type in [(root / "m", "MOKA"), (root / "l", "LORA"), (root / "x", "LOKR"),
                              (outside / "o", "MOKA")]:  # fmt: skip
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (root / "out").symlink_to(outside / "o")  # leaves the folder
    (root / "alias").symlink_to(root / "m")  # stays inside
    (root / "m2").mkdir()
    (root / "m2" / "adapter_config.json").symlink_to(outside / "o" / "adapter_config.json")
    r = MokaDirResolver(root)

    def resolve(name):
        return asyncio.run(r.resolve_lora("base", name))

    assert resolve("m").lora_path == str(root.resolve() / "m")
    assert resolve("l").lora_name == "l"
    # An unsupported peft_type is found: the loader answers it with 400 and the reason.
    assert resolve("x") is not None
    assert resolve("alias") is not None
    for name in ["missing", "../m", "m/", ".m", "a" * 5000, "é" * 200, "m\0", ""]:
        assert resolve(name) is None, name  # never raises (5,000 characters: ENAMETOOLONG)
    assert resolve("out") is None and resolve("m2") is None
    monkeypatch.setenv("MOKA_ALLOW_SYMLINKS", "1")
    assert resolve("out") is not None


def test_adapter_configs_read_by_one_reader_with_reasons(tmp_path):
    from moka_core.adapter_format import read_config_json
    from moka_serve.plugin.lora_model import read_peft_type

    f = tmp_path / "adapter_config.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_config_json(f)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_peft_type(tmp_path)
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        read_peft_type(tmp_path)
    f.write_text('{"peft_type": "MOKA"}' + " " * (1 << 20))
    with pytest.raises(ValueError, match="over the"):
        read_config_json(f)


def test_bank_limits_from_env(monkeypatch):
    from moka_core.limits import bank_limits

    monkeypatch.setenv("MOKA_MAX_COMPONENTS", "7")
    monkeypatch.setenv("MOKA_MAX_FACTOR_NUMEL", "100")
    assert bank_limits() == (7, 100)
    monkeypatch.setenv("MOKA_MAX_COMPONENTS", "zero")
    with pytest.raises(ValueError, match="MOKA_MAX_COMPONENTS"):
        bank_limits()


def test_component_limit_counts_rank_one_components_as_one(monkeypatch):
    """moka-train's mixed family at a rank-8 LoRA's size (a balanced term and 7 rank-1 terms)
    is two kernel entries, within the default limit of 4; five balanced terms are not. The
    precheck and the trainer's serving note agree (one counting rule, moka_core.limits)."""
    import torch

    from moka_core.adapter_check import moka_limit_problem
    from moka_core.limits import kernel_entries

    monkeypatch.delenv("MOKA_MAX_COMPONENTS", raising=False)
    mixed = [(24, 24, 24, 24)] + [(576, 1, 1, 576)] * 6 + [(1, 576, 576, 1)]
    assert kernel_entries(mixed) == 2
    assert kernel_entries(mixed, identity_a=True) == 8
    a = [torch.zeros(m1, n1) for m1, n1, _, _ in mixed]
    b = [torch.zeros(m2, n2) for _, _, m2, n2 in mixed]
    assert moka_limit_problem("q_proj", a, b) is None
    five = [torch.zeros(24, 24)] * 5
    assert "5 components exceed the limit of 4" in moka_limit_problem("q_proj", five, five)
    monkeypatch.setenv("MOKA_MAX_COMPONENTS", "1")
    assert "2 components exceed the limit of 1" in moka_limit_problem("q_proj", a, b)


@pytest.mark.parametrize(
    "moka_compile, enforce_eager, enable_lora, compiled",
    [
        ("1", False, True, True),  # the plugin keeps an adapter engine compiled
        ("0", False, True, False),  # MOKA_COMPILE=0: eager, as vLLM's CPU platform chooses
        ("1", True, True, False),  # --enforce-eager stays eager
        ("1", False, False, True),  # the plain engine: vLLM's own choice, untouched
    ],
)
def test_compile_decision(monkeypatch, moka_compile, enforce_eager, enable_lora, compiled):
    """The CPU platform's compilation mode for an engine's config, as the plugin leaves it.

    No engine: the config is what ``LLM(...)`` builds first. The served tokens of the compiled
    adapter engine are the mixed-batch test's; eager runs the same ops without the graph."""
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs

    from moka_core.base_models import tiny_llama_dir
    from moka_serve.plugin import cpu_compile

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv(cpu_compile.ENV, moka_compile)
    cpu_compile.install()
    config = EngineArgs(
        model=str(tiny_llama_dir()),
        enable_lora=enable_lora,
        enforce_eager=enforce_eager,
        dtype="float32",
        max_model_len=128,
    ).create_engine_config()
    expected = CompilationMode.DYNAMO_TRACE_ONCE if compiled else CompilationMode.NONE
    assert config.compilation_config.mode == expected


def test_same_name_fix_keeps_one_request_per_adapter_id():
    """vLLM's runners collected a step's adapters into a set, and ``LoRARequest`` compares by
    name: two ids under one name became one (the engine core then died on the other's tokens).
    The v2 runner's ``LoraState`` here; the v1 runner in an engine test (test_vllm_plugin.py)."""
    from vllm.lora.request import LoRARequest
    from vllm.v1.worker.gpu.lora_utils import LoraState

    from moka_serve.plugin import same_name_fix

    same_name_fix.install()
    first, second = LoRARequest("a", 1, "/one"), LoRARequest("a", 2, "/two")
    other = LoRARequest("b", 3, "/three")
    state = LoraState(max_num_reqs=8)
    for index, (req_id, request) in enumerate(
        [("r0", first), ("r1", second), ("r2", first), ("r3", None), ("r4", other)]
    ):
        state.add_request(req_id, index, request)
    got = state.get_activate_loras(["r0", "r1", "r2", "r3", "r4"])
    assert [r.lora_int_id for r in got] == [1, 2, 3]
    _, _, requests = state.make_lora_inputs(
        ["r1", "r4"], np.array([1, 4]), np.array([2, 3], dtype=np.int32)
    )
    assert [r.lora_int_id for r in requests] == [2, 3]
    merged = same_name_fix.ORIGINALS["get_activate_loras"](state, ["r0", "r1"])
    assert len(merged) == 1  # what the fix is for: vLLM's own collection merges 1 and 2
