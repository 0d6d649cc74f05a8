"""MoKA pools in a real engine (issue #12): slots cost what their adapters weigh.

One tiny-Llama engine, MoKA-only (``MOKA_ONLY=1``, as ``moka-serve --moka-only`` starts it: no
LoRA buffers per slot, LoRA adapters refused) with 2 slots and ``MOKA_SLOT_NUMEL`` sized so that
the q/k/v pool holds one big and one small adapter at once. A second big one is refused at load
time with its sizes, the engine keeps serving exactly, and unloading the first makes room. Bytes
are measured on the engine's layers.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from vllm_helpers import (  # noqa: E402
    Reference,
    check_against_reference,
    lora_request,
    moka_deltas,
    random_moka,
    run,
    tiny_engine,
    tiny_prompts,
    write_moka,
    write_random_lora,
)

pytestmark = pytest.mark.slow

SMALL = {"q_proj": [[16, 16, 16, 16]]}  # 512 pool elements per layer
BIG = {"q_proj": [[16, 16, 16, 16]] * 2, "v_proj": [[8, 16, 16, 16]] * 2}  # 1024 + 768
SLOT_NUMEL = 1536  # pool of 2 slots: 3072 >= BIG's 1792 + SMALL's 512, < 2 x BIG's


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moka_core.base_models import build_tiny_llama

    root = tmp_path_factory.mktemp("pool")
    base = build_tiny_llama(root / "tiny-llama", seed=0)
    folders, deltas = {}, {}
    for name, comps, seed in [("small", SMALL, 1), ("big", BIG, 2), ("big-2", BIG, 3)]:
        adapter = random_moka(comps, seed=seed)
        folders[name] = write_moka(root / name, adapter)
        deltas[name] = moka_deltas(adapter)
    return {"base": base, "folders": folders, "deltas": deltas}


@pytest.fixture(scope="module")
def llm(setup):
    with tiny_engine(
        setup["base"],
        {"max_lora_rank": 1},
        MOKA_SLOT_NUMEL=f"qkv_proj={SLOT_NUMEL},o_proj=0",
        MOKA_ONLY="1",
    ) as engine:
        yield engine


def _memory(worker) -> dict:
    from moka_serve.plugin.layers import lora_buffers
    from moka_serve.plugin.model_manager import slot_memory

    w = getattr(worker, "worker", worker)
    manager = w.model_runner.lora_manager._adapter_manager
    qkv = [m.moka_bank for n, m in manager.moka_layers().items() if n.endswith("qkv_proj")]
    lora = [t for m in manager.modules.values() for t in lora_buffers(m)]
    return {
        **slot_memory(manager),
        "lora_buffer_storage_bytes": sum(t.untyped_storage().nbytes() for t in lora),
        "lora_buffer_numel": sum(t.numel() for t in lora),
        "lora_slots_seen": [t.shape[0] for t in lora],
        "qkv_pool_numel": [b.pool_numel for b in qkv],
        "qkv_held": [b.held_numel for b in qkv],
        "qkv_packed_bytes": sum(b.cpu.packed.numel() * b.cpu.packed.element_size() for b in qkv),
    }


def test_pool_admits_what_fits_refuses_the_rest_and_keeps_serving(llm, setup):
    reference = Reference(setup["base"])
    prompts = tiny_prompts(setup["base"])
    f, d = setup["folders"], setup["deltas"]
    small, big, big2 = (lora_request(f"pool-{n}", f[n]) for n in ("small", "big", "big-2"))
    outs = run(llm, [prompts[0], prompts[1], prompts[2]], [small, big, None])
    for out, p, name in zip(outs, prompts, ["small", "big", None], strict=False):
        check_against_reference(reference, p, d[name] if name else None, out)

    with pytest.raises(Exception) as err:
        llm.llm_engine.add_lora(big2)
    assert "2 slots could need 3584 of the pool's 3072" in str(err.value), err.value
    assert "MOKA_SLOT_NUMEL" in str(err.value)
    again = run(llm, [prompts[1], prompts[0]], [big, small])
    assert [o[0] for o in again] == [outs[1][0], outs[0][0]]

    assert llm.llm_engine.remove_lora(big.lora_int_id)  # unloading frees its admission
    out = run(llm, [prompts[1], prompts[2]], [big2, small])
    check_against_reference(reference, prompts[1], d["big-2"], out[0])
    check_against_reference(reference, prompts[2], d["small"], out[1])


def test_moka_only_slots_cost_what_their_adapters_weigh(llm, setup):
    """MoKA-only engine on CPU: no LoRA buffers (vLLM's are zero views with every slot: one
    element of memory each), no MoKA pool (CPU); what the q/k/v layers keep is the two adapters
    held, in float32."""
    run(llm, [tiny_prompts(setup["base"])[0]] * 2,
        [lora_request("pool-small", setup["folders"]["small"]),
         lora_request("pool-big-2", setup["folders"]["big-2"])])  # fmt: skip
    m = llm.collective_rpc(_memory)[0]
    assert m["qkv_pool_numel"] == [2 * SLOT_NUMEL] * 4
    assert m["moka_pool_bytes"] == 0  # CPU: nothing preallocated
    assert m["qkv_held"] == [512 + 1792] * 4  # what the two slots hold, in every layer
    # The packed copy keeps each slot's factors in a row as wide as the larger adapter.
    weigh = 4 * 4 * (512 + 1792)  # float32 bytes of the two adapters' factors, 4 layers
    assert m["qkv_packed_bytes"] == 4 * 4 * 2 * 1792
    assert m["qkv_packed_bytes"] <= 1.6 * weigh
    # vLLM's LoRA buffers: rank-1 shapes with both slots (what vLLM reads), 4 bytes of memory
    # each. Every wrapped layer (q/k/v, o, gate/up, down) of 4 layers, embedding and LM head:
    # A and B of 11 slices per layer, 2 + 2 at the edges.
    assert m["lora_slots_seen"] and set(m["lora_slots_seen"]) == {2}
    import json

    vocab = json.loads((setup["base"] / "config.json").read_text())["vocab_size"]
    per_rank = 4 * (3 * 256 + 512 + 256 + 256 + 2 * 256 + 1024 + 512 + 256) + 2 * (256 + vocab)
    assert m["lora_buffer_numel"] == 2 * per_rank  # the shapes of rank-1 buffers for 2 slots
    assert m["lora_buffer_storage_bytes"] == 4 * (4 * 14 + 4)  # 60 tensors, one float32 each
    assert m["lora_bytes"] == m["lora_buffer_storage_bytes"] // 2  # per slot, what the log says
    # moka-serve's slot planner (--adapter-memory) predicts what the engine reserves: rank 0
    # (MoKA-only) gives no LoRA bytes, rank 1 what a rank-1 engine would keep.
    from vllm_helpers import TINY_DIMS, TINY_LAYERS

    from moka_core.slots import lora_slot_bytes, table_slot_bytes

    assert lora_slot_bytes(TINY_DIMS, TINY_LAYERS, vocab, 0, 4) == 0
    assert lora_slot_bytes(TINY_DIMS, TINY_LAYERS, vocab, 1, 4) == 4 * per_rank
    assert table_slot_bytes(TINY_LAYERS) == m["moka_table_bytes"] > 0


def test_moka_only_engine_refuses_lora_adapters_and_keeps_serving(llm, setup, tmp_path):
    """A LoRA on a MoKA-only engine (even of rank 1, which fits ``max_lora_rank``): a clear
    load-time error naming the cause, and the engine keeps serving MoKA and base exactly."""
    lora = tmp_path / "lora-r1"
    write_random_lora(lora, ["q_proj", "v_proj"], r=1, seed=5)
    with pytest.raises(Exception) as err:
        llm.llm_engine.add_lora(lora_request("pool-lora", lora))
    assert "serves MoKA adapters only" in str(err.value), err.value
    reference = Reference(setup["base"])
    prompts = tiny_prompts(setup["base"])
    outs = run(llm, prompts[:2], [lora_request("pool-small", setup["folders"]["small"]), None])
    check_against_reference(reference, prompts[0], setup["deltas"]["small"], outs[0])
    check_against_reference(reference, prompts[1], None, outs[1])
