"""The MoKA vLLM plugin with the real engine: CPU, float32, the tiny Llama, one engine per module.

The engine compiles (the plugin keeps vLLM's torch.compile on with LoRA; which configurations
compile is ``test_vllm_plugin_unit.py::test_compile_decision``). One batch mixes a base request, three MoKA adapters (all
three qkv slices, a MoKAs variant, o_proj/down_proj row-parallel and gate/up merged-column
targets, lopsided ``(m, 1, 1, n)`` shapes) and a LoRA, with ``max_loras=2`` < 4 adapters so slots
are evicted and reloaded; every output must equal a transformers reference with delta_W merged
(tokens exactly, logprobs within 1e-4). Every adapter is loaded after the model was compiled.
Bad adapters must give clear errors while the engine keeps serving.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from vllm_helpers import (  # noqa: E402
    MAX_TOKENS,
    MIXED_NAMES,
    Reference,
    check_against_reference,
    check_mixed_batch,
    lora_request,
    mixed_adapters,
    random_moka,
    run,
    run_with_a_change_midway,
    tiny_engine,
    tiny_prompts,
    write_moka,
    write_random_lora,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-plugin")


@pytest.fixture(scope="module")
def base_dir(workdir) -> Path:
    from moka_core.base_models import build_tiny_llama

    return build_tiny_llama(workdir / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def adapters(workdir) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    return mixed_adapters(workdir)


@pytest.fixture(scope="module")
def llm(base_dir):
    with tiny_engine(base_dir) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(base_dir) -> Reference:
    return Reference(base_dir)


@pytest.fixture(scope="module")
def prompts(base_dir) -> list[list[int]]:
    return tiny_prompts(base_dir)


def test_mixed_batch_matches_reference(llm, reference, adapters, prompts):
    check_mixed_batch(llm, reference, adapters, prompts)


def _compilation_state(worker) -> dict:
    from vllm.config import CompilationMode

    w = getattr(worker, "worker", worker)
    runner = w.model_runner
    return {
        "mode": CompilationMode(runner.vllm_config.compilation_config.mode).name,
        "compiled": bool(getattr(runner.model.model, "compiled", False)),
    }


def test_engine_compiles_with_adapters_enabled(llm):
    """vLLM's CPU platform turns compilation off with LoRA; the plugin turns it back on."""
    assert llm.collective_rpc(_compilation_state)[0] == {
        "mode": "DYNAMO_TRACE_ONCE",
        "compiled": True,
    }


def _cpu_kernel_loaded(worker) -> tuple[bool, set[str]]:
    """Whether the kernel is loaded, and how the MoKA layers that served adapters call it."""
    from moka_kernels import cpu_kernel

    w = getattr(worker, "worker", worker)
    layers = w.model_runner.lora_manager._adapter_manager.moka_layers().values()
    calls = {type(m._cpu_call).__name__ for m in layers if getattr(m, "_cpu_call", None)}
    return cpu_kernel.loaded(), calls


def test_engine_serves_decode_steps_with_the_cpp_kernel(llm):
    """The C++ kernel was built at engine start (CI's cache is empty: built there) and loaded in
    the worker, so the mixed batch above ran through it, each layer's arguments read once
    (``LayerCall``; where torch has more than one thread, prefill chunks over 64 tokens take
    the torch path: ``moka_kernels.cpu_kernel.takes``)."""
    assert llm.collective_rpc(_cpu_kernel_loaded) == [(True, {"LayerCall"})]


def _count_adapter_calls(worker, reset: bool) -> dict[str, int]:
    """Count ``apply_adapters`` calls per MoKA layer (the body of the custom op)."""
    w = getattr(worker, "worker", worker)
    manager = w.model_runner.lora_manager._adapter_manager
    counts = {}
    for name, module in manager.moka_layers().items():
        if reset:
            inner = type(module).apply_adapters.__get__(module)

            def counted(x, output, _inner=inner, _module=module):
                _module.moka_calls += 1
                return _inner(x, output)

            module.moka_calls = 0
            module.apply_adapters = counted
        counts[name] = module.moka_calls
    return counts


def test_compiled_engine_runs_the_op_once_per_adapted_layer_per_step(llm, adapters, prompts):
    """Fails when the op is bypassed (traced code baked in: no call at run time) or called
    more than once per layer and step."""
    tokens = 6
    llm.collective_rpc(_count_adapter_calls, args=(True,))
    name = "moka-qkv"
    run(llm, [prompts[0]], [lora_request(name, adapters[name][0])], max_tokens=tokens)
    counts = llm.collective_rpc(_count_adapter_calls, args=(False,))[0]
    # 4 layers x (qkv, o, gate_up, down): one prefill step and tokens - 1 decode steps
    assert len(counts) == 16
    assert set(counts.values()) == {tokens}, counts


def _trace_adapted_layer(worker) -> dict:
    """Dynamo over a real MoKA layer's forward with ``fullgraph=True`` (a graph break raises),
    the ops of the traced graph, and the compiled result beside the eager one."""
    from vllm.forward_context import set_forward_context

    w = getattr(worker, "worker", worker)
    runner = w.model_runner
    manager = runner.lora_manager._adapter_manager
    layer = next(m for n, m in manager.moka_layers().items() if n.endswith("0.self_attn.qkv_proj"))
    moka_slot = next(s for s in range(layer.moka_bank.num_slots) if layer.moka_bank.entries[s])
    layer.moka_meta.update(torch.tensor([moka_slot, -1, moka_slot, moka_slot, -1]))
    ops: list[str] = []

    def recording_backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(5, layer.input_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode(), set_forward_context(None, runner.vllm_config):
            eager = layer(x)[0].clone()
            compiled = torch.compile(layer.forward, fullgraph=True, backend=recording_backend)
            got = compiled(x)[0].clone()
    finally:
        manager._last_mapping = None  # the next engine step rebuilds the step's metadata
    base = layer.base_layer.quant_method.apply(layer.base_layer, x)
    return {"ops": ops, "eager": eager, "compiled": got, "base": base}


def test_adapted_layer_traces_to_one_graph_with_one_op(llm, adapters, prompts):
    name = "moka-qkv"
    run(llm, [prompts[0]], [lora_request(name, adapters[name][0])])  # a slot holds it now
    r = llm.collective_rpc(_trace_adapted_layer)[0]
    assert r["ops"].count("moka_serve.adapters") == 1, r["ops"]
    torch.testing.assert_close(r["compiled"], r["eager"], rtol=0, atol=0)
    rows_with_adapter = [0, 2, 3]
    assert not torch.allclose(r["eager"][rows_with_adapter], r["base"][rows_with_adapter])
    torch.testing.assert_close(r["eager"][[1, 4]], r["base"][[1, 4]], rtol=0, atol=0)


def test_adapters_reloaded_after_compilation_are_applied(llm, reference, adapters, prompts):
    """Adapters cycled through 2 slots, one at a time, after the graph was compiled: each
    result is its own adapter's (the compiled graph did not capture slot contents)."""
    order = [*MIXED_NAMES, *MIXED_NAMES[::-1], MIXED_NAMES[0]]
    for i, name in enumerate(order):
        prompt = prompts[i % len(prompts)]
        got = run(llm, [prompt], [lora_request(name, adapters[name][0])])[0]
        check_against_reference(reference, prompt, adapters[name][1], got)


def _worker_slots(worker) -> list[int | None]:
    w = getattr(worker, "worker", worker)
    return list(w.model_runner.lora_manager._adapter_manager.lora_index_to_id)


def slots(llm) -> list[int | None]:
    return llm.collective_rpc(_worker_slots)[0]


def _worker_adapter_kinds(worker) -> dict[int, str]:
    """Adapter id -> the class of what the worker's manager holds for it."""
    w = getattr(worker, "worker", worker)
    manager = w.model_runner.lora_manager._adapter_manager
    return {i: type(a).__name__ for i, a in manager._registered_adapters.items()}


def _worker_vllm_lora_slots(worker) -> list[int]:
    """Slots whose vLLM LoRA buffers some adapted layer holds weights in (its LoRA ops run)."""
    w = getattr(worker, "worker", worker)
    manager = w.model_runner.lora_manager._adapter_manager
    return sorted({s for m in manager.moka_layers().values() for s in m._lora_slots})


def vllm_path_lora(monkeypatch, adapters):
    """The mixed batch's LoRA under another name, loaded with ``MOKA_CPU_LORA=0``: vLLM's own
    CPU LoRA path serves it (the engine is in this process, its loader reads the setting)."""
    monkeypatch.setenv("MOKA_CPU_LORA", "0")
    return lora_request("lora-qvdown-vllm", adapters["lora-qvdown"][0])


def test_lora_is_served_through_the_moka_op_on_cpu(llm, reference, adapters, prompts):
    """On CPU a LoRA is one low-rank entry per module in the MoKA banks: vLLM's LoRA buffers
    stay empty and its LoRA ops never run; the output is the merged reference's, and with
    ``MOKA_CPU_LORA=0`` the same folder goes through vLLM's path to the same tokens."""
    lora = lora_request("lora-qvdown", adapters["lora-qvdown"][0])
    got = run(llm, [prompts[2]], [lora])[0]
    check_against_reference(reference, prompts[2], adapters["lora-qvdown"][1], got)
    assert llm.collective_rpc(_worker_adapter_kinds)[0][lora.lora_int_id] == "MokaLoRAModel"
    assert llm.collective_rpc(_worker_vllm_lora_slots)[0] == []


def test_lora_with_moka_cpu_lora_off_takes_vllms_path(
    llm, reference, adapters, prompts, monkeypatch
):
    lora = vllm_path_lora(monkeypatch, adapters)
    got = run(llm, [prompts[2]], [lora])[0]
    check_against_reference(reference, prompts[2], adapters["lora-qvdown"][1], got)
    assert llm.collective_rpc(_worker_adapter_kinds)[0][lora.lora_int_id] == "LoRAModel"
    assert llm.collective_rpc(_worker_vllm_lora_slots)[0] != []


def _worker_lora_decisions(worker, folder: str) -> dict[str, str]:
    """What :func:`lora_as_moka_model` makes of the LoRA in ``folder`` as it is, with weights
    outside the adapted linear layers, with modules to save, in pools that admit it but whose
    slot share it exceeds, and with ``MOKA_CPU_LORA=0`` (admissions are undone)."""
    import copy

    from vllm.lora.request import LoRARequest

    from moka_serve.plugin import worker_manager
    from moka_serve.plugin.lora_model import lora_as_moka_model

    w = getattr(worker, "worker", worker)
    wm = w.model_runner.lora_manager
    manager = wm._adapter_manager
    lora = worker_manager._ORIGINAL_LOAD_ADAPTER(wm, LoRARequest("probe", 999, folder))

    def kind(model) -> str:
        got = lora_as_moka_model(manager, model, "probe")
        manager.release_moka(999)
        return type(got).__name__

    held = lora_as_moka_model(manager, lora, "probe")
    manager.release_moka(999)
    out = {"as it is": type(held).__name__}
    outside = copy.copy(lora)
    first = next(iter(lora.loras.values()))
    outside.loras = {**lora.loras, "model.embed_tokens": first}
    out["outside"] = kind(outside)
    saved = copy.copy(lora)
    saved.modules_to_save = {"score": object()}
    out["modules to save"] = kind(saved)
    # Each pool exactly the LoRA's size, nothing else admitted: it fits the pool (admission
    # passes) but not one slot's share of it.
    banks = {n: manager.modules[n].moka_bank for n in held.moka_images}
    saved_state = {n: (b.pool_numel, b.admitted) for n, b in banks.items()}
    for n, b in banks.items():
        b.pool_numel, b.admitted = held.moka_images[n].numel, {}
    try:
        out["over a slot's share"] = kind(lora)
    finally:
        for n, b in banks.items():
            b.pool_numel, b.admitted = saved_state[n]
    previous = os.environ.get("MOKA_CPU_LORA")
    os.environ["MOKA_CPU_LORA"] = "0"
    try:
        out["setting off"] = kind(lora)
    finally:
        os.environ.pop("MOKA_CPU_LORA")
        if previous is not None:
            os.environ["MOKA_CPU_LORA"] = previous
    return out


def test_loras_the_moka_op_cannot_take_keep_vllms_path(llm, adapters):
    got = llm.collective_rpc(_worker_lora_decisions, args=(str(adapters["lora-qvdown"][0]),))[0]
    assert got == {
        "as it is": "MokaLoRAModel",
        "outside": "NoneType",
        "modules to save": "NoneType",
        "over a slot's share": "NoneType",
        "setting off": "NoneType",
    }


def test_base_request_beside_lora_in_last_slot(llm, reference, adapters, prompts, monkeypatch):
    """vLLM's CPU ops gave slot -1 tokens the LoRA of the last slot; the plugin fixes that."""
    from vllm.lora.ops.torch_ops import lora_ops

    if os.environ.get("MOKA_DISABLE_CPU_LORA_FIX") != "1":  # set it to watch this test fail
        assert getattr(lora_ops.bgmv_shrink, "__moka_fixed__", False), "CPU fix not installed"
    a = lora_request("moka-qkv", adapters["moka-qkv"][0])
    b = lora_request("mokas-o-down", adapters["mokas-o-down"][0])
    lora = vllm_path_lora(monkeypatch, adapters)
    run(llm, [prompts[0]], [a])
    run(llm, [prompts[0]], [b])
    first = slots(llm)
    assert set(first) == {a.lora_int_id, b.lora_int_id}
    # Touch slot 0's adapter so the last slot's one is evicted and the LoRA lands there.
    run(llm, [prompts[0]], [a if first[0] == a.lora_int_id else b])
    outs = run(llm, [prompts[1], prompts[2]], [None, lora])
    assert slots(llm)[-1] == lora.lora_int_id
    check_against_reference(reference, prompts[1], None, outs[0])
    check_against_reference(reference, prompts[2], adapters["lora-qvdown"][1], outs[1])


def test_moka_in_a_slot_a_lora_held_serves_beside_a_lora(
    llm, reference, adapters, prompts, monkeypatch
):
    """The plugin zeroes a slot's LoRA buffers only when a LoRA wrote them; a MoKA adapter
    taking the slot a LoRA left must still see zeros there when a LoRA in the same batch makes
    vLLM's LoRA ops run over every token (a LoRA on vLLM's path: ``MOKA_CPU_LORA=0``)."""
    a = lora_request("moka-qkv", adapters["moka-qkv"][0])
    b = lora_request("mokas-o-down", adapters["mokas-o-down"][0])
    lora = vllm_path_lora(monkeypatch, adapters)
    run(llm, [prompts[0]], [lora])
    lora_slot = slots(llm).index(lora.lora_int_id)
    run(llm, [prompts[0]], [a])
    run(llm, [prompts[0]], [b])  # evicts the LoRA, the least recently used
    assert slots(llm)[lora_slot] == b.lora_int_id
    outs = run(llm, [prompts[1], prompts[2]], [b, lora])  # the LoRA evicts a
    assert set(slots(llm)) == {b.lora_int_id, lora.lora_int_id}
    check_against_reference(reference, prompts[1], adapters["mokas-o-down"][1], outs[0])
    check_against_reference(reference, prompts[2], adapters["lora-qvdown"][1], outs[1])


def _bad(workdir: Path, adapters, case: str) -> tuple[Path, str]:
    """Build a bad adapter folder; return it and a substring of the expected error."""
    import json

    from safetensors.torch import load_file, save_file

    folder = workdir / f"bad-{case}"
    shutil.rmtree(folder, ignore_errors=True)
    good = adapters["moka-qkv"][0]
    if case == "wrong-shapes":  # SmolLM2-135M dims, not the tiny model's
        dims = {"q_proj": (576, 576)}
        write_moka(folder, random_moka({"q_proj": [[24, 24, 24, 24]]}, seed=9, dims=dims))
        return folder, "q_proj"
    if case == "nan":
        shutil.copytree(good, folder)
        t = load_file(str(folder / "adapter_model.safetensors"))
        key = sorted(t)[0]
        t[key][0, 0] = float("nan")
        save_file(t, str(folder / "adapter_model.safetensors"))
        return folder, "non-finite"
    if case == "truncated":
        shutil.copytree(good, folder)
        f = folder / "adapter_model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        return folder, "truncated"
    if case == "unknown-peft-type":
        shutil.copytree(good, folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["peft_type"] = "LOKR"
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder, "unsupported peft_type 'LOKR'"
    if case == "missing-weights":
        shutil.copytree(good, folder)
        (folder / "adapter_model.safetensors").unlink()
        return folder, "missing adapter_model.safetensors"
    if case == "missing-folder":
        return folder, "bad-missing-folder"
    if case == "too-many-components":
        write_moka(folder, random_moka({"q_proj": [[16, 16, 16, 16]] * 5}, seed=10))
        return folder, "5 components exceed the limit of 4"
    if case == "factor-too-large":
        write_moka(folder, random_moka({"q_proj": [[128, 128, 2, 2]]}, seed=11))
        return folder, "buffer holds 4096"
    if case == "module-not-in-base":
        ad = random_moka({"q_proj": [[16, 16, 16, 16]]}, seed=12, layers=6)  # base has 4 layers
        write_moka(folder, ad)
        return folder, "does not exist in this base model"
    if case == "lora-rank-too-large":
        write_random_lora(folder, ["q_proj"], seed=13, r=32, alpha=32)
        return folder, "max_lora_rank"
    if case == "lora-nan":
        shutil.copytree(adapters["lora-qvdown"][0], folder)
        t = load_file(str(folder / "adapter_model.safetensors"))
        key = next(k for k in sorted(t) if "lora_B" in k)
        t[key][1, 0] = float("inf")
        save_file(t, str(folder / "adapter_model.safetensors"))
        return folder, "lora_B has non-finite values"
    if case == "lora-wrong-shapes":  # written for a 320-wide base: used to kill the engine
        dims = {"q_proj": (320, 320), "v_proj": (64, 320)}
        write_random_lora(folder, ["q_proj", "v_proj"], seed=14, dims=dims)
        return folder, "do not fit this base's 256x256 layer"
    if case == "lora-truncated":  # vLLM's loader raised safetensors' own error: a 500
        shutil.copytree(adapters["lora-qvdown"][0], folder)
        f = folder / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return folder, "cannot read its weights (truncated or corrupt?)"
    if case == "lora-rank-not-config":  # rank-8 tensors, r=4 in the config: wrong alpha / r
        write_random_lora(folder, ["q_proj"], seed=15, r=8)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["r"] = 4
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder, "has rank 8, the adapter's config says r=4"
    raise AssertionError(case)


BAD_CASES = [
    "lora-truncated",
    "lora-rank-not-config",
    "lora-nan",
    "lora-wrong-shapes",
    "wrong-shapes",
    "nan",
    "truncated",
    "unknown-peft-type",
    "missing-weights",
    "missing-folder",
    "too-many-components",
    "factor-too-large",
    "module-not-in-base",
    "lora-rank-too-large",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_adapter_is_rejected_and_engine_keeps_serving(
    llm, reference, adapters, prompts, workdir, case
):
    folder, expected = _bad(workdir, adapters, case)
    with pytest.raises(Exception) as err:
        llm.llm_engine.add_lora(lora_request(f"bad-{case}", folder))
    assert expected in str(err.value), str(err.value)
    name = "moka-o-gateup"
    outs = run(llm, [prompts[3], prompts[4]], [lora_request(name, adapters[name][0]), None])
    check_against_reference(reference, prompts[3], adapters[name][1], outs[0])
    check_against_reference(reference, prompts[4], None, outs[1])


def test_reference_agrees_with_moka_trainer_reference(base_dir, adapters, reference, prompts):
    """The deltas used above equal the project's reference merge (moka_core.reference)."""
    from transformers import AutoTokenizer

    from moka_core.reference import greedy_generate, load_reference_model, lora_deltas

    mine = adapters["lora-qvdown"][1]
    theirs = lora_deltas(adapters["lora-qvdown"][0])
    assert set(mine) == set(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k])
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    text = "Once upon a time"
    ids = tok.encode(text)
    for name in ("moka-qkv", "mokas-o-down"):
        model = load_reference_model(base_dir, adapter_dir=adapters[name][0])
        want = greedy_generate(model, tok, text, MAX_TOKENS, ignore_eos=True)
        assert reference.generate(ids, MAX_TOKENS, adapters[name][1])[0] == want


def _cpu_cached(worker) -> list[int]:
    w = getattr(worker, "worker", worker)
    return sorted(w.model_runner.lora_manager._adapter_manager.list_adapters())


@pytest.mark.parametrize(
    "name,change", [("moka-qkv", "nan"), ("lora-qvdown", "truncate"), ("mokas-o-down", "delete")]
)
def test_reload_after_eviction_reads_the_snapshot_not_the_changed_folder(
    llm, reference, adapters, prompts, workdir, name, change
):
    """Served, evicted from vLLM's CPU cache (max_cpu_loras=4), then its folder is changed on
    disk: the next request reloads inside the engine step. It used to read the changed folder
    and kill the engine; it now reads the worker's snapshot and serves the adapter as it was."""
    from safetensors.torch import load_file, save_file

    folder = workdir / f"snap-{name}-{change}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapters[name][0], folder)
    req = lora_request(f"snap-{name}-{change}", folder)
    first = run(llm, [prompts[1]], [req])[0]
    check_against_reference(reference, prompts[1], adapters[name][1], first)
    for other in MIXED_NAMES:  # four others fill the CPU cache of 4
        run(llm, [prompts[0]], [lora_request(other, adapters[other][0])])
    assert req.lora_int_id not in llm.collective_rpc(_cpu_cached)[0]
    weights = folder / "adapter_model.safetensors"
    if change == "nan":
        t = load_file(str(weights))
        save_file({k: torch.full_like(v, float("nan")) for k, v in t.items()}, str(weights))
    elif change == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        shutil.rmtree(folder)
    again = run(llm, [prompts[1], prompts[2]], [req, None])
    assert again[0] == first
    check_against_reference(reference, prompts[2], None, again[1])


def _snapshot_ids(worker) -> list[int]:
    from moka_serve.plugin.snapshots import SNAPSHOTS

    return sorted({key[0] for key in SNAPSHOTS._paths})


def test_unload_drops_the_snapshot(llm, reference, adapters, prompts, workdir):
    """An unloaded adapter's snapshot is removed by the first step that runs no request of it
    (the store holds what is registered or still running, no more), and loading the folder
    again under a new id reads what is on disk now."""
    folder = workdir / "snap-unload"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapters["moka-qkv"][0], folder)
    req = lora_request("snap-unload", folder)
    run(llm, [prompts[0]], [req])
    assert req.lora_int_id in llm.collective_rpc(_snapshot_ids)[0]
    assert llm.llm_engine.remove_lora(req.lora_int_id)
    run(llm, [prompts[0]], [None])  # a step without it
    assert req.lora_int_id not in llm.collective_rpc(_snapshot_ids)[0]
    shutil.rmtree(folder)
    shutil.copytree(adapters["lora-qvdown"][0], folder)
    again = lora_request("snap-unload-again", folder)
    out = run(llm, [prompts[1]], [again])[0]
    check_against_reference(reference, prompts[1], adapters["lora-qvdown"][1], out)
    # Unloaded and loaded again at once under the same id (no step between: its snapshot is
    # still retired), the folder changed meanwhile: the load reads the folder as it is now.
    assert llm.llm_engine.remove_lora(again.lora_int_id)
    shutil.rmtree(folder)
    shutil.copytree(adapters["mokas-o-down"][0], folder)
    assert llm.llm_engine.add_lora(again)
    out = run(llm, [prompts[1]], [again])[0]
    check_against_reference(reference, prompts[1], adapters["mokas-o-down"][1], out)


def test_unloaded_while_running_finishes_with_the_adapter_it_started_with(
    llm, reference, adapters, prompts, workdir
):
    """An adapter unloaded while its request runs, its folder then deleted: the next step loads
    it again (vLLM lets running requests finish), from the retired snapshot, and the request
    ends exactly as the adapter it started with gives it. It used to read the folder, and a
    folder gone or broken by then killed the engine."""
    folder = workdir / "unload-running"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapters["moka-qkv"][0], folder)
    req = lora_request("unload-running", folder)

    def unload_and_delete():
        assert llm.llm_engine.remove_lora(req.lora_int_id)
        shutil.rmtree(folder)

    out = run_with_a_change_midway(llm, prompts[2], req, unload_and_delete)
    check_against_reference(reference, prompts[2], adapters["moka-qkv"][1], out)
    run(llm, [prompts[0]], [None])
    assert req.lora_int_id not in llm.collective_rpc(_snapshot_ids)[0]


def test_two_ids_under_one_name_in_one_batch_each_get_their_own_adapter(
    llm, reference, adapters, prompts
):
    """Two adapter ids under one name in one step (what an unload and a load of the same name
    give while requests of the first load still run): each request gets its own adapter.
    vLLM 0.32 merged them by name, activated one, and the step died (``same_name_fix``)."""
    names = ["moka-qkv", "mokas-o-down"]
    requests = [
        lora_request(f"same-name-{n}", adapters[n][0], served_as="same-name") for n in names
    ]
    assert len({r.lora_int_id for r in requests}) == 2
    assert not {r.lora_int_id for r in requests} & set(llm.llm_engine.list_loras())  # not active
    outs = run(llm, prompts[:2], requests)
    for prompt, name, got in zip(prompts[:2], names, outs, strict=True):
        check_against_reference(reference, prompt, adapters[name][1], got)


def test_a_peft_saved_moka_adapter_is_served_exactly(llm, reference, prompts, base_dir, workdir):
    """``get_peft_model`` + ``save_pretrained`` (``moka_peft``) -> the engine serves the folder
    unchanged, token for token with the reference merged from the PEFT layers' own deltas."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from moka_peft import MokaPeftConfig

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = MokaPeftConfig(
        targets={
            "q_proj": {"components": [[16, 16, 16, 16], [256, 1, 1, 256], [256, 1, 1, 256]]},
            "down_proj": {"components": [[16, 32, 16, 16]]},
        },
        scaling=2.0,
    )
    tuned = peft.get_peft_model(model, config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "moka_" in name:
                p.normal_(0, 0.1)
    folder = workdir / "peft-saved"
    tuned.save_pretrained(folder)
    layers = dict(tuned.base_model.model.named_modules())
    deltas = {
        path: layers[path].get_delta_weight("default").detach().double()
        for path, m in layers.items()
        if hasattr(m, "moka_B")
    }
    assert len(deltas) == 8  # q_proj and down_proj of 4 layers
    request = lora_request("peft-saved", folder)
    outs = run(llm, [prompts[0], prompts[1]], [request, None])
    check_against_reference(reference, prompts[0], deltas, outs[0])
    check_against_reference(reference, prompts[1], None, outs[1])
    assert outs[0][0] != run(llm, [prompts[0]], [None])[0][0]  # the adapter changes the answer
