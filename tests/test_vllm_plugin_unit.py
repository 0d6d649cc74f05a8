"""Plugin pieces that need vLLM importable but no engine: checks, the CPU-op fix, the resolver."""

from __future__ import annotations

import asyncio
import json

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


def test_resolver_finds_moka_and_lora_folders(tmp_path):
    from moka_serve.plugin.resolver import MokaDirResolver

    for name, peft_type in [("m", "MOKA"), ("l", "LORA"), ("x", "LOKR")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    r = MokaDirResolver(tmp_path)

    def resolve(name):
        return asyncio.run(r.resolve_lora("base", name))

    assert resolve("m").lora_path == str(tmp_path / "m")
    assert resolve("l").lora_name == "l"
    assert resolve("x") is None
    assert resolve("missing") is None
    assert resolve("../m") is None


def test_bank_limits_from_env(monkeypatch):
    from moka_serve.plugin.layers import bank_limits

    monkeypatch.setenv("MOKA_MAX_COMPONENTS", "7")
    monkeypatch.setenv("MOKA_MAX_FACTOR_NUMEL", "100")
    assert bank_limits() == (7, 100)
    monkeypatch.setenv("MOKA_MAX_COMPONENTS", "zero")
    with pytest.raises(ValueError, match="MOKA_MAX_COMPONENTS"):
        bank_limits()
