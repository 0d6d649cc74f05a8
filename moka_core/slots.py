"""How many adapter slots fit in a memory budget, and what one slot costs (no vLLM import).

A slot is where one adapter sits while its requests run; a batch holds at most ``--max-loras``
distinct adapters, so under a many-adapter load the slot count decides latency (issue #12). Per
slot the engine keeps, in every adapted layer of every decoder layer:

* vLLM's LoRA buffers: ``max_lora_rank x (in + out)`` per output slice (q, k, v; gate, up; o;
  down), plus the embedding's and the LM head's. MoKA-only engines (``moka-serve --moka-only``,
  ``MOKA_ONLY``) keep none: rank 0 here.
* MoKA factor storage: on GPU a preallocated pool of ``MOKA_SLOT_NUMEL`` elements per slot and
  layer (``moka_kernels.bank``); on CPU the torch path's packed copy, which grows with the
  adapters held (half precision is packed as float32 there). Plus the slot table: one row per
  Kronecker entry a slot can hold (``MOKA_MAX_COMPONENTS`` per output slice).

:func:`plan_slots` sizes the MoKA storage from the adapters in a folder (the largest one per
layer kind) and divides the budget by the per-slot cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moka_kernels.bank import NUM_FIELDS

# vLLM module (layer kind) -> the checkpoint modules packed into it, in slice order.
KINDS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 4}
# One row of a MoKA bank's slot table: ``moka_kernels.bank.NUM_FIELDS`` int32 fields.
TABLE_ROW_BYTES = NUM_FIELDS * 4


@dataclass(frozen=True)
class SlotPlan:
    """Per-slot bytes and the slot count a budget gives."""

    max_loras: int
    lora_bytes: int  # vLLM's LoRA buffers per slot
    moka_bytes: int  # MoKA factor storage and slot table per slot
    slot_numel: dict[str, int]  # MoKA pool elements per slot, per layer kind

    @property
    def slot_bytes(self) -> int:
        return self.lora_bytes + self.moka_bytes

    def env_value(self) -> str:
        """``MOKA_SLOT_NUMEL`` for these sizes."""
        return ",".join(f"{k}={n}" for k, n in self.slot_numel.items())


def lora_slot_bytes(dims: dict[str, tuple[int, int]], layers: int, vocab: int | None,
                    rank: int, elt: int, tp: int = 1) -> int:  # fmt: skip
    """Bytes of vLLM's LoRA buffers for one slot at ``max_lora_rank = rank``, on one rank
    (``rank`` 0: a MoKA-only engine, whose buffers are zero views with no memory per slot).

    Every wrapped layer, and the embedding and LM head when ``vocab`` is known. At ``tp > 1`` a
    rank holds 1/tp of LoRA B (column-parallel layers) or of A (row-parallel o/down);
    replicated KV heads are counted as split.
    """
    per_layer = 0
    for parts in KINDS.values():
        in_f = dims[parts[0]][1]
        outs = sum(dims[p][0] for p in parts)
        row_parallel = parts[0] in ("o_proj", "down_proj")
        a_in = in_f // tp if row_parallel else in_f
        b_out = outs if row_parallel else outs // tp
        per_layer += rank * (len(parts) * a_in + b_out)
    edges = 2 * rank * (vocab + dims["q_proj"][1]) if vocab is not None else 0
    return (layers * per_layer + edges) * elt


def table_slot_bytes(layers: int) -> int:
    """Bytes of the MoKA slot tables for one slot (every layer kind, ``MOKA_MAX_COMPONENTS``
    entries per output slice; at TP=1)."""
    from moka_core.limits import bank_limits

    slices = sum(len(parts) for parts in KINDS.values())
    return layers * slices * bank_limits()[0] * TABLE_ROW_BYTES


def adapter_numel_by_kind(folder: Path) -> dict[str, int]:
    """Factor elements a MoKA adapter takes per layer, by vLLM layer kind (from its config:
    no tensor is read); ``{}`` for a LoRA or an unreadable folder."""
    from moka_core.adapter_format import config_kind, read_config_json

    try:
        cfg = read_config_json(folder / "adapter_config.json")
    except (OSError, ValueError):
        return {}
    if config_kind(cfg) != "MOKA" or not isinstance(cfg.get("targets"), dict):
        return {}
    identity = cfg.get("variant") == "mokas"
    out: dict[str, int] = {}
    for kind, parts in KINDS.items():
        total = 0
        for part in parts:
            target = cfg["targets"].get(part)
            if not isinstance(target, dict):
                continue
            for comp in target.get("components") or []:
                m1, n1, m2, n2 = (int(v) for v in comp)
                total += (0 if identity else m1 * n1) + m2 * n2
        if total:
            out[kind] = total
    return out


def plan_slots(
    folders: list[Path],
    base_dims: dict[str, tuple[int, int]],
    layers: int,
    vocab: int,
    *,
    budget_bytes: int,
    max_lora_rank: int,
    dtype: str,
    on_cpu: bool,
) -> SlotPlan:
    """Slots that fit ``budget_bytes``, each sized for the largest adapter of ``folders``."""
    elt = DTYPE_BYTES.get(dtype, 4)
    moka_elt = 4 if on_cpu else elt  # the CPU path packs half precision as float32
    slot_numel = {kind: 0 for kind in KINDS}
    for folder in folders:
        for kind, n in adapter_numel_by_kind(folder).items():
            slot_numel[kind] = max(slot_numel[kind], n)
    lora = lora_slot_bytes(base_dims, layers, vocab, max_lora_rank, elt)
    moka = layers * sum(slot_numel.values()) * moka_elt + table_slot_bytes(layers)
    count = max(1, budget_bytes // max(lora + moka, 1))
    return SlotPlan(int(count), lora, moka, slot_numel)


def vocab_size(base: str | Path) -> int | None:
    try:
        return int(json.loads((Path(base) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
