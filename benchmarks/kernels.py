#!/usr/bin/env python
"""Check and time every MoKA kernel variant against a dense GEMM and a rank-16 LoRA baseline.

One call checks each variant against the float64 ``torch.kron`` reference, then times it over
layers x token counts x token->adapter mappings, and prints a Markdown table (full table first,
a one-line-per-case summary last) plus optional JSON::

    python benchmarks/kernels.py [--device cuda|cpu] [--quick] [--out results.json]
    python benchmarks/kernels.py --device cpu --quick --check-only --interpret-triton

Variants (rows of the table):

* ``triton-decode`` / ``triton-prefill`` / ``triton-auto``: ``moka_apply_triton`` with that
  ``form`` (CUDA, or CPU through Triton's interpreter with ``--interpret-triton``).
* ``torch``: ``moka_apply_torch`` (tokens grouped by slot on the host, two matmuls per component).
* ``cpu-auto``: what the plugin runs on CPU (``moka_apply`` over an unpooled bank): the C++ kernel
  (``moka_kernels.cpu_kernel``, built into ``$MOKA_CACHE/kernels`` first) up to 64 tokens, the
  torch path above.
* ``base-gemm``: the frozen layer itself, ``x @ W.T`` with a dense ``(out, in)`` weight.
* ``loraR-bgmv``: rank-R LoRA, Punica's BGMV in torch: gather each token's ``A (r, in)`` and
  ``B (out, r)`` by slot, then two ``torch.bmm`` (no host sync; the gather is materialised).
* ``loraR-grouped``: rank-R LoRA, tokens grouped by slot on the host, two matmuls per slot
  (the same scheme as the MoKA torch path).
* ``loraR-cpp``: rank-R LoRA through the plugin's CPU path (``cpu-auto``): each slot holds the
  LoRA as one low-rank entry, ``U = B (out, R)``, ``V = A (R, in)``: what a CPU engine runs for
  a LoRA adapter (``MOKA_CPU_LORA``, ``moka_serve.plugin.lora_model.lora_as_moka_model``).
* ``loraR-vllm``: rank-R LoRA through vLLM's own ops, called as vLLM 0.32's punica wrapper calls
  them: on CUDA ``lora_shrink`` + ``lora_expand`` (Triton), on the CPU ``bgmv_shrink`` +
  ``bgmv_expand_slice`` (torch). Absent, with a ``#`` line saying why, when vLLM is not importable.
  The "x LoRA" column divides by the fastest LoRA row of the same case.

The LoRA rank R is the layer's: 16 beside the ``kron``-family layers (4 balanced terms), and the
rank whose size the adapter has beside ``moka-train``'s default ``mixed`` adapters (layers named
``...mixed-rR``: shapes planned by ``moka_core.shapes.plan_shapes`` with a rank-R LoRA's budget,
a balanced term and R-1 rank-1 terms, which the kernels apply as one rank-(R-1) pair).

With both Llama-3-8B layers in the run, a last table projects the per-decode-step time the
adapters add to a Llama-3-8B-shaped model (32 blocks x (q_proj + v_proj)) against the time of all
its linear-layer GEMMs (``project_llama3_step``).

The floor of each row: bytes (x read once, y read and written once, the factors of the distinct
slots used read once; for the GEMM the weight read once and y written once) over peak bandwidth,
and FLOPs over peak FLOP/s; the larger of the two.

Timing: CUDA uses ``triton.testing.do_bench`` (median, L2 flushed before each run) or, with
``--cuda-graph``, ``do_bench_cudagraph`` for the variants that can be captured; the CPU uses the
median of ``time.perf_counter`` over repeats. Data is random (never zeros); bf16 on CUDA, fp32
on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from moka_kernels import (  # noqa: E402
    KronEntry,
    MokaBank,
    cpu_kernel,
    moka_apply,
    moka_apply_naive,
    moka_apply_torch,
)
from moka_kernels.bank import group_rank_one  # noqa: E402
from moka_kernels.torch_ops import group_tokens  # noqa: E402

# --------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Layer:
    name: str
    in_features: int
    out_features: int
    comps: tuple[tuple[int, int, int, int], ...]  # (m1, n1, m2, n2): A is m1 x n1, B is m2 x n2
    small: bool  # SmolLM2 shapes: the only layers run under --interpret-triton
    lora_rank: int = 16  # the LoRA baseline's rank (the same size for mixed layers)


def mixed_layer(model: str, target: str, dims: dict, layers: int, rank: int, small: bool) -> Layer:
    """``moka-train``'s default adapter for one module at a rank-R LoRA's size (its planner,
    the ``mixed`` family, over ``layers`` blocks of q_proj and v_proj)."""
    from moka_core.shapes import plan_lora_sized

    shapes = plan_lora_sized(dims, dict.fromkeys(dims, layers), rank)
    comps = tuple(tuple(c.as_list()) for c in shapes[target])
    out_f, in_f = dims[target]
    return Layer(f"{model}.{target}.mixed-r{rank}", in_f, out_f, comps, small, rank)


LLAMA3_8B_QV = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}
SMOLLM2_QV = {"q_proj": (576, 576), "v_proj": (192, 576)}

LAYERS = [
    Layer(
        "llama3-8b.q_proj",
        4096,
        4096,
        ((64, 64, 64, 64), (32, 128, 128, 32), (128, 32, 32, 128), (16, 256, 256, 16)),
        False,
    ),
    Layer(
        "llama3-8b.v_proj",
        4096,
        1024,
        ((32, 64, 32, 64), (16, 128, 64, 32), (64, 32, 16, 128), (8, 256, 128, 16)),
        False,
    ),
    Layer(
        "smollm2-135m.q_proj",
        576,
        576,
        ((24, 24, 24, 24), (12, 48, 48, 12), (48, 12, 12, 48), (16, 36, 36, 16)),
        True,
    ),
    Layer(
        "smollm2-135m.v_proj",
        576,
        192,
        ((12, 24, 16, 24), (16, 36, 12, 16), (8, 72, 24, 8), (24, 16, 8, 36)),
        True,
    ),
] + [
    mixed_layer(model, target, dims, layers, rank, small)
    for model, dims, layers, small in (
        ("llama3-8b", LLAMA3_8B_QV, 32, False),
        ("smollm2-135m", SMOLLM2_QV, 30, True),
    )
    for rank in (2, 8)
    for target in ("q_proj", "v_proj")
]

TOKENS_FULL = [1, 16, 64, 256, 4096]
TOKENS_QUICK_CPU = [1, 16, 64]
TOKENS_INTERPRET = [1, 4]
MAPPINGS = ["distinct", "identical", "uniform", "chunk"]
MOKA_VARIANTS_TRITON = ["triton-decode", "triton-prefill", "triton-auto"]
# Relative to the reference's max |value|; bf16 as asked, the others a few ulps of headroom.
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-10}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Datasheet rates (dense, no sparsity): (substring of the device name, bytes/s, FLOP/s).
DATASHEET = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM
]


def mapping_slots(name: str, num_tokens: int, num_slots: int) -> torch.Tensor:
    """Punica's mappings. Runs of a slot are contiguous (one request's tokens are)."""
    pos = torch.arange(num_tokens)
    if name == "distinct":  # every token its own adapter while slots last, then equal runs
        return pos if num_tokens <= num_slots else pos * num_slots // num_tokens
    if name == "identical":
        return torch.zeros(num_tokens, dtype=torch.long)
    if name == "uniform":  # about sqrt(T) equal groups
        groups = max(1, min(num_slots, round(math.sqrt(num_tokens))))
        return pos * groups // num_tokens
    if name == "chunk":  # one request's prefill chunk (slot 0), then 7 decode tokens (1, 2, ...)
        decodes = min(7, num_tokens - 1, num_slots - 1)
        first = num_tokens - decodes
        return torch.where(pos < first, 0, 1 + (pos - first).clamp(min=0) % max(num_slots - 1, 1))
    raise ValueError(name)


def distinct_mappings(num_tokens: int, num_slots: int) -> list[tuple[str, torch.Tensor]]:
    """The mappings of one token count, merging those that coincide (all three at T=1)."""
    out: list[tuple[str, torch.Tensor]] = []
    for name in MAPPINGS:
        slots = mapping_slots(name, num_tokens, num_slots)
        for i, (other, s) in enumerate(out):
            if torch.equal(s, slots):
                out[i] = (f"{other}={name}", s)
                break
        else:
            out.append((name, slots))
    return out


# --------------------------------------------------------------------------------------------
# Weights


@dataclass
class LayerData:
    layer: Layer
    bank: MokaBank  # timed, in the benchmark dtype, padding poisoned with NaN
    ref_bank: MokaBank  # same (rounded) factors in float64, for references at timed sizes
    lora_a: torch.Tensor  # (S + 1, r, in); the last slot is zero, used for slot -1
    lora_b: torch.Tensor  # (S + 1, out, r)
    weight: torch.Tensor  # (out, in), the base layer
    cpu_bank: MokaBank | None = None  # CPU: unpooled, as the plugin builds it (C++ kernel)
    lora_cpu_bank: MokaBank | None = None  # CPU: the LoRA as one rank-R entry per slot


def build_layer(
    layer: Layer, num_slots: int, dtype: torch.dtype, device: str, seed: int
) -> LayerData:
    for m1, n1, m2, n2 in layer.comps:
        assert m1 * m2 == layer.out_features and n1 * n2 == layer.in_features, (layer, m1, n1)
    gen = torch.Generator().manual_seed(seed)
    slots_terms = []
    for _ in range(num_slots):
        terms = []
        for m1, n1, m2, n2 in layer.comps:
            a = (torch.randn(m1, n1, generator=gen, dtype=torch.float64) / n1**0.5).to(dtype)
            b = (torch.randn(m2, n2, generator=gen, dtype=torch.float64) / n2**0.5).to(dtype)
            terms.append(KronEntry(b=b, a=a))
        slots_terms.append(group_rank_one(terms))  # as the server folds an adapter
    entries = slots_terms[0]
    cap = max(max(m1 * n1, m2 * n2) for m1, n1, m2, n2 in layer.comps)
    numel = sum(e.a.numel() + e.b.numel() for e in entries)
    args = (num_slots, len(entries), cap, cap, layer.in_features, layer.out_features)
    bank = MokaBank(*args, dtype=dtype, device=device, pooled=True, pool_numel=num_slots * numel)
    ref_bank = MokaBank(*args, dtype=torch.float64, device=device, pooled=True,
                        pool_numel=num_slots * numel)  # fmt: skip
    for slot, entries in enumerate(slots_terms):
        bank.write_slot(slot, entries)
        ref_bank.write_slot(
            slot, [dataclasses.replace(e, a=e.a.double(), b=e.b.double()) for e in entries]
        )
    cpu_bank = None
    if torch.device(device).type == "cpu":
        cpu_bank = MokaBank(*args, dtype=dtype, device=device, pooled=False)
        for slot, entries in enumerate(slots_terms):
            cpu_bank.write_slot(slot, entries)
    # Poison the pool outside the slots' factors: a kernel that reads it produces NaN.
    if bank.pool is not None:
        used = torch.zeros(bank.pool_numel, dtype=torch.bool, device=bank.pool.device)
        for start, n in bank.regions.values():
            used[start : start + n] = True
        bank.pool[~used] = float("nan")
    r = layer.lora_rank
    lora_a = (
        torch.randn(num_slots + 1, r, layer.in_features, generator=gen) / layer.in_features**0.5
    )
    lora_b = torch.randn(num_slots + 1, layer.out_features, r, generator=gen) / r**0.5
    lora_a[-1] = 0.0
    lora_b[-1] = 0.0
    weight = torch.randn(layer.out_features, layer.in_features, generator=gen)
    weight /= layer.in_features**0.5
    lora_cpu_bank = None
    if cpu_bank is not None:  # U = B (out, r), V = A (r, in): the low-rank entry of the kernels
        numel = max(layer.out_features, layer.in_features) * r
        lora_cpu_bank = MokaBank(num_slots, 1, numel, numel, layer.in_features,
                                 layer.out_features, dtype=dtype, device=device, pooled=False)  # fmt: skip
        for slot in range(num_slots):
            u, v = lora_b[slot].to(dtype), lora_a[slot].to(dtype)
            lora_cpu_bank.write_slot(slot, [KronEntry(b=v, a=u, rank=r)])
    return LayerData(
        layer,
        bank,
        ref_bank,
        lora_a.to(device=device, dtype=dtype),
        lora_b.to(device=device, dtype=dtype),
        weight.to(device=device, dtype=dtype),
        cpu_bank,
        lora_cpu_bank,
    )


# --------------------------------------------------------------------------------------------
# Variants: every one is f(x, y, slots) -> None, adding into y in place (the GEMM overwrites y).

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def lora_bgmv(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Fn:
    """Punica's BGMV semantics in torch: per-token gathered factors, two batched GEMVs."""
    zero_slot = lora_a.shape[0] - 1

    def fn(x, y, slots):
        idx = torch.where(slots < 0, zero_slot, slots)  # slot -1 reads the zero adapter
        h = torch.bmm(lora_a.index_select(0, idx), x.unsqueeze(-1))  # (T, r, 1)
        y += torch.bmm(lora_b.index_select(0, idx), h).squeeze(-1)

    return fn


def lora_grouped(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Fn:
    """Tokens grouped by slot on the host, then ``(x_s @ A_s.T) @ B_s.T`` per slot."""

    def fn(x, y, slots):
        for slot, idx in group_tokens(slots):
            whole = idx.numel() == x.shape[0]
            xs = x if whole else x.index_select(0, idx)
            delta = (xs @ lora_a[slot].T) @ lora_b[slot].T
            if whole:
                y += delta
            else:
                y.index_add_(0, idx, delta)

    return fn


def vllm_lora_torch(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Fn:
    """vLLM's CPU LoRA: ``PunicaWrapperCPU.add_lora_linear`` for one slice, decode path.

    A float32 ``(T, r)`` buffer, ``bgmv_shrink`` (scale 1) into it, ``bgmv_expand_slice`` over
    all of y with ``add_inputs=True``. The prefill path (``sgmv_*``) is the same bgmv after a
    ``repeat_interleave`` of the indices, so this times both. The factors are stacked the way
    vLLM stacks them, ``(max_loras, 1, r, in)`` and ``(max_loras, 1, out, r)``. Slot -1 indexes the
    last slot, as it does in vLLM; here that slot is the zero adapter.
    """
    from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

    a, b = lora_a.unsqueeze(1), lora_b.unsqueeze(1)
    rank = lora_a.shape[1]

    def fn(x, y, slots):
        buffer = torch.zeros((x.shape[0], rank), dtype=torch.float32, device=x.device)
        bgmv_shrink(x, a, buffer, slots, 1.0)
        bgmv_expand_slice(buffer, b, y, slots, 0, y.shape[1], True)

    return fn


def vllm_lora_triton(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Fn:
    """vLLM's CUDA LoRA: ``PunicaWrapperGPU.add_lora_linear`` for one slice.

    vLLM prepares the kernel metadata (``LoRAKernelMeta.prepare_tensors``: tokens sorted by slot,
    counts, active ids) once per step and shares it across every layer, so it is built here the
    first time a mapping is seen (the untimed check call) and not timed. Each call then does
    what a layer does: an empty float32 ``(1, T, r)`` buffer, ``lora_shrink`` (scale 1; it
    zeroes the buffer), ``lora_expand`` with ``add_inputs=True``. The grid covers
    ``max_loras + 1`` slots, as with vLLM's default ``specialize_active_lora=False``. Factors are
    stacked as in vLLM, ``(max_loras, 1, r, in)`` and ``(max_loras, 1, out, r)``; slot -1 tokens
    are skipped by the kernels.
    """
    from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    from vllm.lora.ops.triton_ops import utils as vllm_triton_utils

    # vLLM caches the factors' pointers and strides by data_ptr; this script frees one layer's
    # factors before building the next, which can land at the same address with other strides.
    vllm_triton_utils._LORA_A_PTR_DICT.clear()
    vllm_triton_utils._LORA_B_PTR_DICT.clear()
    a, b = (lora_a.unsqueeze(1),), (lora_b.unsqueeze(1),)
    max_loras, rank = lora_a.shape[0], lora_a.shape[1]
    state: dict = {}

    def fn(x, y, slots):
        if state.get("slots") is not slots:  # a new mapping: a new step's metadata
            meta = LoRAKernelMeta.make(max_loras, slots.numel(), x.device)
            meta.prepare_tensors(slots)
            state.update(slots=slots, meta=meta.meta_args(slots.numel(), False))
        buffer = torch.empty((1, x.shape[0], rank), dtype=torch.float32, device=x.device)
        lora_shrink(x, a, buffer, *state["meta"], 1.0)
        lora_expand(buffer, b, y, *state["meta"], offset_start=0, add_inputs=True)

    return fn


VllmLora = Callable[[torch.Tensor, torch.Tensor], Fn]


def find_vllm_lora(device: str, dtype: torch.dtype) -> tuple[VllmLora | None, str]:
    """The ``loraR-vllm`` builder for this device, or None; and a line saying which or why not.

    Optional by design: the GPU host has no vLLM (there ``loraR-bgmv`` stands in for Punica).
    """
    try:
        import vllm

        if device == "cuda":
            if dtype not in (torch.float16, torch.bfloat16):
                return None, f"absent: vLLM's lora_shrink takes fp16/bf16 only, not {dtype}"
            import vllm.lora.ops.triton_ops  # noqa: F401

            ops = "triton_ops lora_shrink + lora_expand (PunicaWrapperGPU)"
            return vllm_lora_triton, f"vLLM {vllm.__version__} {ops}"
        import vllm.lora.ops.torch_ops  # noqa: F401

        ops = "torch_ops bgmv_shrink + bgmv_expand_slice (PunicaWrapperCPU decode)"
        return vllm_lora_torch, f"vLLM {vllm.__version__} {ops}"
    except Exception as exc:  # not installed, or a build whose ops do not import here
        return None, f"absent: vLLM LoRA ops not importable ({type(exc).__name__}: {exc})"


def base_gemm(weight: torch.Tensor) -> Fn:
    wt = weight.t()

    def fn(x, y, slots):
        torch.mm(x, wt, out=y)

    return fn


def moka_variants(data: LayerData, use_triton: bool) -> dict[str, Fn]:
    bank = data.bank
    out: dict[str, Fn] = {}
    if use_triton:
        from moka_kernels.triton_ops import moka_apply_triton

        for form in ("decode", "prefill", "auto"):
            out[f"triton-{form}"] = lambda x, y, s, form=form: moka_apply_triton(
                x, y, s, bank, form=form
            )
    out["torch"] = lambda x, y, s: moka_apply_torch(x, y, s, bank)
    if data.cpu_bank is not None and cpu_kernel.loaded():  # what the plugin runs on CPU
        out["cpu-auto"] = lambda x, y, s: moka_apply(x, y, s, data.cpu_bank)
    return out


def adapter_variants(
    data: LayerData, use_triton: bool, vllm_lora: VllmLora | None
) -> dict[str, Fn]:
    out = moka_variants(data, use_triton)
    lora = f"lora{data.layer.lora_rank}"
    out[f"{lora}-bgmv"] = lora_bgmv(data.lora_a, data.lora_b)
    out[f"{lora}-grouped"] = lora_grouped(data.lora_a, data.lora_b)
    if vllm_lora is not None:
        out[f"{lora}-vllm"] = vllm_lora(data.lora_a, data.lora_b)
    if data.lora_cpu_bank is not None and cpu_kernel.loaded():
        out[f"{lora}-cpp"] = lambda x, y, s: moka_apply(x, y, s, data.lora_cpu_bank)
    return out


# loraR-vllm: vLLM captures these ops in its own decode graphs (metadata prepared outside).
CAPTURABLE_SUFFIXES = ("triton-decode", "triton-prefill", "triton-auto", "-bgmv", "-vllm",
                       "base-gemm")  # fmt: skip


def capturable(variant: str) -> bool:
    return variant.endswith(CAPTURABLE_SUFFIXES)


def auto_form(num_tokens: int, num_slots: int) -> str:
    from moka_kernels.triton_ops import DECODE_BLOCK_T, choose_block_t

    return "decode" if choose_block_t(num_tokens, num_slots) == DECODE_BLOCK_T else "prefill"


# --------------------------------------------------------------------------------------------
# References and checks


def lora_reference(data: LayerData, x: torch.Tensor, y0: torch.Tensor, slots: torch.Tensor):
    """float64 ``y0 + B_s (A_s x)`` per token (slot -1: y0)."""
    y = y0.double().clone()
    a64, b64 = data.lora_a.double(), data.lora_b.double()
    lora_grouped(a64, b64)(x.double(), y, slots)
    return y


def moka_reference(data: LayerData, x, y0, slots, naive: bool):
    y = y0.double().clone()
    if naive:  # the torch.kron ground truth, from the timed (rounded) factors
        moka_apply_naive(x.double(), y, slots, data.bank)
    else:  # the torch path in float64, for sizes where kron per token is too slow
        moka_apply_torch(x.double(), y, slots, data.ref_bank)
    return y


def compare(got: torch.Tensor, want: torch.Tensor, y0: torch.Tensor, slots: torch.Tensor):
    """(max |got - want| / max |want|, ||got - want|| / ||want||, -1 rows untouched)."""
    got = got.double().cpu()
    want = want.double().cpu()
    diff = got - want
    scale = want.abs().max().clamp_min(1e-30)
    err_max = (diff.abs().max() / scale).item() if got.numel() else 0.0
    err_norm = (diff.norm() / want.norm().clamp_min(1e-30)).item() if got.numel() else 0.0
    none = (slots < 0).cpu()
    untouched = bool(torch.equal(got[none], y0.double().cpu()[none])) if none.any() else True
    if not math.isfinite(err_max):
        err_max = float("inf")
    return err_max, err_norm, untouched


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn: Fn, x, y0, slots, device: str) -> torch.Tensor:
    y = y0.clone()
    fn(x, y, slots)
    sync(device)
    return y


def randn(shape, gen: torch.Generator, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def correctness_checks(
    data: LayerData, variants: dict[str, Fn], num_tokens: int, dtype, device, seed
) -> list[dict]:
    """Every variant on a few tokens with mixed slots and -1, against float64 references."""
    layer = data.layer
    gen = torch.Generator(device=device).manual_seed(seed)
    pattern = [1, -1, 0, 1, -1, 2, 1]
    slots = torch.tensor(pattern[:num_tokens], device=device)
    x = randn((num_tokens, layer.in_features), gen, dtype, device)
    y0 = randn((num_tokens, layer.out_features), gen, dtype, device)
    want_moka = moka_reference(data, x, y0, slots, naive=True)
    want_lora = lora_reference(data, x, y0, slots)
    want_base = x.double() @ data.weight.double().T
    results = []
    all_variants = dict(variants)
    all_variants["base-gemm"] = base_gemm(data.weight)
    for name, fn in all_variants.items():
        want = want_lora if name.startswith("lora") else want_moka
        if name == "base-gemm":
            want = want_base
        row = {"layer": layer.name, "variant": name, "tokens": num_tokens, "slots": slots.tolist()}
        try:
            got = run_once(fn, x, y0, slots, device)
            if name == "base-gemm":  # overwrites y: no untouched rows to check
                err_max, err_norm, _ = compare(got, want, y0, torch.zeros_like(slots))
                untouched = True
            else:
                err_max, err_norm, untouched = compare(got, want, y0, slots)
            ok = err_max <= TOL[dtype] and untouched
            row.update(err_max=err_max, err_norm=err_norm, untouched_ok=untouched, ok=ok)
        except Exception as exc:  # a crash is a failed check
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        results.append(row)
    return results


# --------------------------------------------------------------------------------------------
# Timing


def time_cuda(
    fn: Callable[[], None], warmup_ms: float, rep_ms: float, graph: bool
) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) microseconds per call."""
    import triton.testing as tt

    q = [0.5, 0.2, 0.8]
    if graph:
        ms = tt.do_bench_cudagraph(fn, rep=rep_ms, quantiles=q)
    else:
        ms = tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=q)
    if not isinstance(ms, (list, tuple)):
        ms = [ms, ms, ms]
    return float(ms[0]) * 1e3, float(ms[1]) * 1e3, float(ms[2]) * 1e3


def time_cpu(
    fn: Callable[[], None], budget_s: float, min_reps: int = 3
) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) microseconds per call over about ``budget_s`` seconds,
    after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(min(200, max(min_reps, budget_s / max(first, 1e-7))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def measure_ceilings(device: str, dtype: torch.dtype, quick: bool) -> dict:
    """A large device-to-device copy (bytes read + written) and a large matmul, measured once."""
    gen = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        n_copy, n_mm = 1 << 28, 8192  # 512 MiB of bf16; 1.1 TFLOP
    else:
        n_copy, n_mm = 1 << 24, (1024 if quick else 2048)
    src = randn((n_copy,), gen, dtype, device)
    dst = torch.empty_like(src)
    a = randn((n_mm, n_mm), gen, dtype, device)
    b = randn((n_mm, n_mm), gen, dtype, device)
    c = torch.empty_like(a)
    if device == "cuda":
        t_copy = time_cuda(lambda: dst.copy_(src), 25, 100, False)[0]
        t_mm = time_cuda(lambda: torch.mm(a, b, out=c), 25, 100, False)[0]
    else:
        t_copy = time_cpu(lambda: dst.copy_(src), 0.2)[0]
        t_mm = time_cpu(lambda: torch.mm(a, b, out=c), 0.3 if quick else 1.0)[0]
    bw = 2 * src.numel() * src.element_size() / (t_copy * 1e-6)
    flops = 2 * n_mm**3 / (t_mm * 1e-6)
    return {"bandwidth_Bps": bw, "flops_per_s": flops, "copy_numel": n_copy, "matmul_n": n_mm}


def gemm_timer(
    timer: Callable[[Callable[[], None], str], dict], device: str, dtype: torch.dtype
) -> Callable[[int, int, int], float]:
    """``gemm_us(in, out, T)``: median microseconds of the dense ``x @ W.T`` of that shape, with
    the run's own timer (so it compares with the rows); each weight is made once and reused."""
    gen = torch.Generator(device=device).manual_seed(1)
    weights: dict[tuple[int, int], torch.Tensor] = {}

    def gemm_us(in_f: int, out_f: int, tokens: int) -> float:
        if (in_f, out_f) not in weights:
            weights[in_f, out_f] = randn((out_f, in_f), gen, dtype, device) / in_f**0.5
        x = randn((tokens, in_f), gen, dtype, device)
        y = torch.empty((tokens, out_f), dtype=dtype, device=device)
        gemm = base_gemm(weights[in_f, out_f])
        return timer(lambda: gemm(x, y, None), "base-gemm")["time_us"]

    return gemm_us


# --------------------------------------------------------------------------------------------
# Floors


def moka_cost(bank: MokaBank, slots: list[int], elt: int) -> tuple[float, float]:
    """(bytes, FLOPs) of the MoKA update: x, y in and out, each used slot's factors once."""
    tokens = len(slots)
    used = [s for s in set(slots) if s >= 0]
    nbytes = elt * tokens * (bank.in_features + 2 * bank.out_features)
    for s in used:
        for e in bank.entries[s]:
            nbytes += elt * e.numel
    flops = 0
    macs_per_slot = {}
    for s in used:
        macs = 0
        for e in bank.entries[s]:
            if e.low_rank:  # U (m, r), V (r, n): a LoRA's shrink and expand
                macs += e.rank * (e.n2 + e.m1)
            elif e.identity_a:
                macs += e.n1 * e.n2 * e.m2
            elif e.a_first:
                macs += e.m1 * e.n1 * e.n2 + e.m1 * e.n2 * e.m2
            else:
                macs += e.n1 * e.n2 * e.m2 + e.m1 * e.n1 * e.m2
        macs_per_slot[s] = macs
    flops = sum(2 * macs_per_slot[s] for s in slots if s >= 0)
    return float(nbytes), float(flops)


def lora_cost(in_f: int, out_f: int, slots: list[int], elt: int, rank: int) -> tuple[float, float]:
    tokens = len(slots)
    used = len({s for s in slots if s >= 0})
    nbytes = elt * (tokens * (in_f + 2 * out_f) + used * rank * (in_f + out_f))
    flops = 2 * sum(1 for s in slots if s >= 0) * rank * (in_f + out_f)
    return float(nbytes), float(flops)


def gemm_cost(in_f: int, out_f: int, tokens: int, elt: int) -> tuple[float, float]:
    return float(elt * (tokens * in_f + out_f * in_f + tokens * out_f)), 2.0 * tokens * in_f * out_f


def floor_us(nbytes: float, flops: float, peaks: dict) -> tuple[float, str]:
    t_mem = nbytes / peaks["bandwidth_Bps"] * 1e6
    t_math = flops / peaks["flops_per_s"] * 1e6
    return (t_mem, "mem") if t_mem >= t_math else (t_math, "math")


# --------------------------------------------------------------------------------------------
# Output


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable ({type(exc).__name__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = f"{cpu} ({os.cpu_count()} logical CPUs)"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["gpu_sms"] = props.multi_processor_count
    info["machine"] = info.get("gpu", info["cpu"])
    return info


def fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| layer | T | mapping | variant | time us | p20-p80 us | floor us | bound | x floor "
        "| x base GEMM | x LoRA (R) |"
    )
    lines = [head, "|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        time_s = fmt(r.get("time_us"), 1) if "error" not in r else "error"
        spread = f"{fmt(r['p20_us'])}-{fmt(r['p80_us'])}" if r.get("p20_us") else "-"
        lines.append(
            f"| {r['layer']} | {r['tokens']} | {r['mapping']} | {r['variant_label']} | {time_s} "
            f"| {spread} | {fmt(r['floor_us'], 2)} | {r['bound']} | {fmt(r.get('x_floor'), 1)} "
            f"| {fmt(r.get('x_base'), 2)} | {fmt(r.get('x_lora'), 2)} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One line per (layer, T, mapping): the fastest MoKA variant against GEMM and LoRA."""
    lines = [
        "| layer | T | mapping | best MoKA | time us | x floor | base GEMM us | LoRA (R) us "
        "| x base | x LoRA |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["variant"] != "base-gemm":
            cases.setdefault((r["layer"], r["tokens"], r["mapping"]), []).append(r)
    for (layer, tokens, mapping), rs in cases.items():
        moka = [r for r in rs if r["kind"] == "moka" and r.get("time_us") is not None]
        if not moka:
            continue
        best = min(moka, key=lambda r: r["time_us"])
        lines.append(
            f"| {layer} | {tokens} | {mapping} | {best['variant_label']} | "
            f"{fmt(best['time_us'])} | {fmt(best.get('x_floor'))} | {fmt(best.get('base_us'))} "
            f"| {fmt(best.get('lora_us'))} | {fmt(best.get('x_base'), 2)} "
            f"| {fmt(best.get('x_lora'), 2)} |"
        )
    return "\n".join(lines)


LLAMA3_8B_BLOCKS = 32
LLAMA3_8B_MLP = ((4096, 14336), (4096, 14336), (14336, 4096))  # gate, up, down: (in, out)
PROJECTION_NOTE = (
    f"Projected per decode step, Llama-3-8B shapes ({LLAMA3_8B_BLOCKS} blocks): time the q_proj + "
    "v_proj adapters add, against the GEMMs of q+v and of all linear layers (q, k, v, o, gate, "
    "up, down), all measured at that T with the same timer (q/o and k/v from the q_proj/v_proj "
    "base-gemm rows, gate/up and down timed after the layers); % = added / all linear GEMMs"
)


def project_llama3_step(rows: list[dict], gemm_us: Callable[[int, int, int], float]) -> list[dict]:
    """Per (T, mapping): what the adapters add to one decode step of a Llama-3-8B-shaped model.

    The adapters sit on q_proj and v_proj of each of the 32 blocks and run one after another on
    one stream, so they add 32 x (time(q) + time(v)), taking the fastest MoKA and the fastest
    LoRA variant of each layer (rank 16 beside the kron layers, the same size beside the mixed
    ones). Against that: the measured base GEMMs of those layers
    (32 x (gemm q + gemm v)) and of all the linear layers of a block (q, k, v, o, gate, up, down),
    each timed at that T with the same timer: q/o and k/v share shapes with the measured q_proj
    and v_proj GEMMs, and ``gemm_us(in, out, T)`` times gate/up and down. vLLM fuses qkv and
    gate/up into one GEMM each (the same FLOPs, a little faster), and the step also runs
    attention, norms, lm_head and sampling, so the percentage overstates the share of the step.
    """
    out = []
    mlp_us: dict[int, float] = {}  # T -> the MLP GEMMs of one block, timed once per T
    for suffix in ("", ".mixed-r2", ".mixed-r8"):
        q, v = f"llama3-8b.q_proj{suffix}", f"llama3-8b.v_proj{suffix}"
        out += project_pair(rows, gemm_us, mlp_us, q, v, suffix.lstrip(".") or "kron (4 terms)")
    return out


def project_pair(
    rows, gemm_us, mlp_us: dict[int, float], q: str, v: str, adapters: str
) -> list[dict]:
    """:func:`project_llama3_step` for one pair of adapted layers (q_proj, v_proj)."""
    n = LLAMA3_8B_BLOCKS
    base_q, base_v = "llama3-8b.q_proj", "llama3-8b.v_proj"  # same shapes, same GEMMs

    def fastest(layer: str, tokens: int, mapping: str, kind: str) -> dict | None:
        key = (layer, tokens, mapping, kind)
        timed = [
            r
            for r in rows
            if (r["layer"], r["tokens"], r["mapping"], r["kind"]) == key and r.get("time_us")
        ]
        return min(timed, key=lambda r: r["time_us"], default=None)

    names = lambda a, b: a if a == b else f"{a}/{b}"  # noqa: E731
    out = []
    for tokens, mapping in dict.fromkeys(
        (r["tokens"], r["mapping"]) for r in rows if r["layer"] == q and r["kind"] != "base"
    ):
        picks = [fastest(lay, tokens, mapping, k) for k in ("moka", "lora") for lay in (q, v)]
        gemms = [fastest(lay, tokens, "-", "base") for lay in (base_q, base_v)]
        if None in picks or None in gemms:
            continue
        moka_q, moka_v, lora_q, lora_v = picks
        gemm_q, gemm_v = (r["time_us"] for r in gemms)
        if tokens not in mlp_us:
            mlp_us[tokens] = sum(gemm_us(i, o, tokens) for i, o in LLAMA3_8B_MLP)
        step_us = n * (2 * gemm_q + 2 * gemm_v + mlp_us[tokens])
        moka_us = n * (moka_q["time_us"] + moka_v["time_us"])
        lora_us = n * (lora_q["time_us"] + lora_v["time_us"])
        out.append(
            {
                "adapters": adapters,
                "lora_rank": next(lay.lora_rank for lay in LAYERS if lay.name == q),
                "tokens": tokens,
                "mapping": mapping,
                "moka_variants": names(moka_q["variant_label"], moka_v["variant_label"]),
                "moka_added_us": moka_us,
                "lora_variants": names(lora_q["variant"], lora_v["variant"]),
                "lora_added_us": lora_us,
                "qv_gemm_us": n * (gemm_q + gemm_v),
                "mlp_gemm_us": n * mlp_us[tokens],
                "step_gemm_us": step_us,
                "moka_pct": 100 * moka_us / step_us,
                "lora_pct": 100 * lora_us / step_us,
            }
        )
    return out


def projection_table(proj: list[dict]) -> str:
    lines = [
        "| MoKA adapter | LoRA rank | T | mapping | MoKA (q/v) | MoKA +ms | LoRA (q/v) | LoRA +ms "
        "| q+v GEMM ms | all linear GEMMs ms | MoKA % | LoRA % |",
        "|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in proj:
        lines.append(
            f"| {p['adapters']} | {p['lora_rank']} | {p['tokens']} | {p['mapping']} "
            f"| {p['moka_variants']} "
            f"| {fmt(p['moka_added_us'] / 1e3, 3)} | {p['lora_variants']} "
            f"| {fmt(p['lora_added_us'] / 1e3, 3)} | {fmt(p['qv_gemm_us'] / 1e3, 3)} "
            f"| {fmt(p['step_gemm_us'] / 1e3, 3)} | {fmt(p['moka_pct'], 1)} "
            f"| {fmt(p['lora_pct'], 1)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="fewer token counts (CPU), shorter timing")
    p.add_argument("--out", type=Path, default=None, help="JSON results (and a .md beside it)")
    p.add_argument("--check-only", action="store_true", help="only the correctness checks")
    p.add_argument(
        "--interpret-triton",
        action="store_true",
        help="CPU: include the Triton variants through TRITON_INTERPRET=1 (SmolLM2 layers, T<=4)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="time capturable variants in graphs")
    p.add_argument("--layers", default=None, help="comma-separated substrings of layer names")
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--num-slots", type=int, default=64)
    p.add_argument("--peak-bw", type=float, default=None, help="bytes/s for the floor")
    p.add_argument("--peak-flops", type=float, default=None, help="FLOP/s for the floor")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--cpu-budget-s", type=float, default=None, help="CPU seconds per timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--tol-scale", type=float, default=1.0, help="multiply the check tolerances (default 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep-going", action="store_true", help="drop failing variants instead of aborting"
    )
    return p.parse_args(argv)


def case_row(
    layer, tokens: int, mapping: str, slots_used: int, variant: str, label: str, kind: str
) -> dict:
    """The identifying columns of one result row (timings and costs are added by the caller)."""
    return {
        "layer": layer.name,
        "in": layer.in_features,
        "out": layer.out_features,
        "tokens": tokens,
        "mapping": mapping,
        "slots_used": slots_used,
        "variant": variant,
        "variant_label": label,
        "kind": kind,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device == "cuda" and (interpret or args.interpret_triton):
        sys.exit("error: unset TRITON_INTERPRET / drop --interpret-triton on CUDA")
    if args.interpret_triton:
        # Must be set before moka_kernels.triton_ops is imported (triton.jit reads it then).
        os.environ["TRITON_INTERPRET"] = "1"
    use_triton = device == "cuda" or args.interpret_triton
    if use_triton:
        try:
            import moka_kernels.triton_ops  # noqa: F401
        except Exception as exc:
            sys.exit(f"error: cannot import moka_kernels.triton_ops: {type(exc).__name__}: {exc}")

    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device == "cuda" else torch.float32)
    )
    elt = torch.empty((), dtype=dtype).element_size()
    if device == "cpu":
        from moka_core.base_models import cache_dir

        if why := cpu_kernel.load(cache_dir() / "kernels"):
            print(f"# cpu-auto left out: {why}")
    layers = [lay for lay in LAYERS if lay.small] if args.interpret_triton else list(LAYERS)
    if args.layers:
        keys = args.layers.split(",")
        layers = [lay for lay in layers if any(k in lay.name for k in keys)]
    if args.tokens:
        token_counts = [int(t) for t in args.tokens.split(",")]
    elif args.interpret_triton:
        token_counts = TOKENS_INTERPRET
    elif args.quick and device == "cpu":
        token_counts = TOKENS_QUICK_CPU
    else:
        token_counts = TOKENS_FULL
    check_tokens = 4 if args.interpret_triton else 5
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10 if args.quick else 25)
    rep_ms = args.rep_ms if args.rep_ms is not None else (30 if args.quick else 100)
    cpu_budget = (
        args.cpu_budget_s if args.cpu_budget_s is not None else (0.02 if args.quick else 0.3)
    )
    torch.manual_seed(args.seed)
    for key in TOL:
        TOL[key] *= args.tol_scale
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info(device)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(
        f"# MoKA kernel benchmark on {device} ({info['machine']}), {dtype}, torch {info['torch']}, "
        f"triton {info['triton']}",
        flush=True,
    )
    print(f"# command: {command}", flush=True)
    vllm_lora, vllm_note = find_vllm_lora(device, dtype)
    print(f"# loraR-vllm: {vllm_note}", flush=True)

    peaks: dict = {}
    if not args.check_only:
        measured = measure_ceilings(device, dtype, args.quick)
        peaks["measured"] = measured
        source = "measured (copy and matmul on this machine)"
        bw, fl = measured["bandwidth_Bps"], measured["flops_per_s"]
        if device == "cuda":
            name = info.get("gpu", "")
            bw, fl, source = 3.35e12, 989e12, f"datasheet H100 SXM (assumed for {name!r})"
            for key, b, f in DATASHEET:
                if key in name:
                    bw, fl, source = b, f, f"datasheet {key}"
                    break
        if args.peak_bw:
            bw, source = args.peak_bw, source + "; bandwidth from --peak-bw"
        if args.peak_flops:
            fl, source = args.peak_flops, source + "; FLOP/s from --peak-flops"
        peaks.update(bandwidth_Bps=bw, flops_per_s=fl, source=source)
        print(
            f"# floor uses {bw / 1e9:.1f} GB/s and {fl / 1e12:.2f} TFLOP/s ({source}); measured "
            f"copy {measured['bandwidth_Bps'] / 1e9:.1f} GB/s, matmul "
            f"{measured['flops_per_s'] / 1e12:.2f} TFLOP/s",
            flush=True,
        )

    result = {
        "machine": info,
        "device": device,
        "dtype": str(dtype),
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "peaks": peaks,
        "timing": (
            (
                "triton.testing.do_bench_cudagraph (capturable variants) / do_bench, median"
                if args.cuda_graph
                else "triton.testing.do_bench, median, L2 flushed per run"
            )
            if device == "cuda"
            else "time.perf_counter, median over repeats"
        ),
        "num_slots": args.num_slots,
        "lora_rank": {lay.name: lay.lora_rank for lay in layers},
        "lora_vllm": vllm_note,
        "checks": [],
        "rows": [],
    }

    def save() -> None:
        if args.out is None:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        if result["rows"]:
            tables = [markdown_table(result["rows"]), summary_table(result["rows"])]
            if result.get("projection"):
                tables += [PROJECTION_NOTE, projection_table(result["projection"]["rows"])]
            args.out.with_suffix(".md").write_text(f"{command}\n\n" + "\n\n".join(tables) + "\n")

    def timer(fn: Callable[[], None], variant: str) -> dict:
        if device == "cuda":
            graph = args.cuda_graph and capturable(variant)
            med, p20, p80 = time_cuda(fn, warmup_ms, rep_ms, graph)
            how = "graph" if graph else "events"
        else:
            (med, p20, p80), how = time_cpu(fn, cpu_budget), "perf_counter"
        return {"time_us": med, "p20_us": p20, "p80_us": p80, "timing": how}

    failed_any = False
    for li, layer in enumerate(layers):
        t_layer = time.perf_counter()
        data = build_layer(layer, args.num_slots, dtype, device, args.seed + 1000 * li)
        variants = adapter_variants(data, use_triton, vllm_lora)
        checks = correctness_checks(data, variants, check_tokens, dtype, device, args.seed + li)
        result["checks"].extend(checks)
        bad = [c for c in checks if not c["ok"]]
        for c in checks:
            status = "ok  " if c["ok"] else "FAIL"
            detail = c.get("error") or (
                f"max err {c['err_max']:.2e} (tol {TOL[dtype]:.0e}), norm err {c['err_norm']:.2e}"
                f", -1 rows untouched: {c['untouched_ok']}"
            )
            print(f"# check {status} {layer.name:22s} {c['variant']:16s} {detail}", flush=True)
        if bad:
            failed_any = True
            names = ", ".join(c["variant"] for c in bad)
            save()
            if not args.keep_going:
                sys.exit(
                    f"error: correctness check failed on {layer.name} for {names} "
                    f"(T={check_tokens}, slots {checks[0]['slots']}); see the lines above. "
                    "Nothing more is timed. (--keep-going drops failing variants and goes on; "
                    "--tol-scale loosens the tolerance.)"
                )
            for c in bad:
                variants.pop(c["variant"], None)
        if args.check_only:
            continue

        gen = torch.Generator(device=device).manual_seed(args.seed + 7 + li)
        for tokens in token_counts:
            x = randn((tokens, layer.in_features), gen, dtype, device)
            y0 = randn((tokens, layer.out_features), gen, dtype, device)
            # The dense layer: mapping-independent, timed once per token count.
            yb = y0.clone()
            gemm = base_gemm(data.weight)
            timed = timer(lambda gemm=gemm, x=x, yb=yb: gemm(x, yb, None), "base-gemm")
            t_base = timed["time_us"]
            nb, nf = gemm_cost(layer.in_features, layer.out_features, tokens, elt)
            f_us, bound = floor_us(nb, nf, peaks)
            base_row = case_row(layer, tokens, "-", 0, "base-gemm", "base-gemm", "base")
            base_row.update(timed, bytes=nb, flops=nf, floor_us=f_us, bound=bound)
            base_row.update(x_floor=t_base / f_us, x_base=1.0, x_lora=None)
            result["rows"].append(base_row)
            for mapping, slots_cpu in distinct_mappings(tokens, args.num_slots):
                t_case = time.perf_counter()
                slots = slots_cpu.to(device)
                slot_list = slots_cpu.tolist()
                case_rows = []
                want_moka = moka_reference(data, x, y0, slots, naive=False)
                want_lora = lora_reference(data, x, y0, slots)
                for name, fn in variants.items():
                    kind = "lora" if name.startswith("lora") else "moka"
                    label = name
                    if name == "triton-auto":
                        label = f"triton-auto({auto_form(tokens, args.num_slots)})"
                    if kind == "moka":
                        nb, nf = moka_cost(data.bank, slot_list, elt)
                    else:
                        nb, nf = lora_cost(
                            layer.in_features, layer.out_features, slot_list, elt, layer.lora_rank
                        )
                    f_us, bound = floor_us(nb, nf, peaks)
                    row = case_row(layer, tokens, mapping, len(set(slot_list)), name, label, kind)
                    row.update(bytes=nb, flops=nf, floor_us=f_us, bound=bound, base_us=t_base)
                    try:
                        # Check at the timed size too (vs the float64 torch path / LoRA), which
                        # doubles as the warm-up that keeps Triton compilation out of the timing.
                        got = run_once(fn, x, y0, slots, device)
                        want = want_lora if kind == "lora" else want_moka
                        err_max, err_norm, untouched = compare(got, want, y0, slots)
                        row.update(check_err_max=err_max, check_err_norm=err_norm)
                        if not (err_max <= TOL[dtype] and untouched):
                            msg = (
                                f"{layer.name} T={tokens} {mapping} {name}: max err "
                                f"{err_max:.2e} > {TOL[dtype]:.0e} against the float64 reference"
                            )
                            if not args.keep_going:
                                save()
                                sys.exit(
                                    f"error: mismatch at the timed size: {msg} "
                                    "(--keep-going records it and goes on)"
                                )
                            raise RuntimeError(msg)
                        del got
                        y = y0.clone()
                        timed = timer(lambda fn=fn, x=x, y=y, s=slots: fn(x, y, s), name)
                        row.update(timed, x_floor=timed["time_us"] / f_us)
                    except SystemExit:
                        raise
                    except Exception as exc:
                        failed_any = True
                        row.update(time_us=None, error=f"{type(exc).__name__}: {exc}")
                        print(
                            f"# error {layer.name} T={tokens} {mapping} {name}: {exc}", flush=True
                        )
                    case_rows.append(row)
                lora_times = [
                    r["time_us"] for r in case_rows if r["kind"] == "lora" and r.get("time_us")
                ]
                t_lora = min(lora_times) if lora_times else None
                for r in case_rows:
                    r["lora_us"] = t_lora
                    t = r.get("time_us")
                    r["x_base"] = t / t_base if t else None
                    r["x_lora"] = t / t_lora if (t and t_lora) else None
                result["rows"].extend(case_rows)
                del want_moka, want_lora
                times = ", ".join(f"{r['variant']} {fmt(r.get('time_us'))}" for r in case_rows)
                print(
                    f"# {layer.name} T={tokens} {mapping} ({time.perf_counter() - t_case:.1f} s)"
                    f": base {fmt(t_base)}, {times} us",
                    flush=True,
                )
            del x, y0, yb
        del data, variants
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
        print(f"# {layer.name} done in {time.perf_counter() - t_layer:.1f} s", flush=True)

    if not args.check_only and {"llama3-8b.q_proj", "llama3-8b.v_proj"} <= {x.name for x in layers}:
        result["projection"] = {
            "blocks": LLAMA3_8B_BLOCKS,
            "note": PROJECTION_NOTE,
            "rows": project_llama3_step(result["rows"], gemm_timer(timer, device, dtype)),
        }
    save()
    if args.check_only:
        n_ok = sum(c["ok"] for c in result["checks"])
        print(f"# checks: {n_ok}/{len(result['checks'])} passed", flush=True)
    else:
        print()
        print(markdown_table(result["rows"]))
        print()
        print(
            "Summary: fastest MoKA variant per case (x base = time / dense GEMM time, "
            "x LoRA = time / fastest rank-16 LoRA)"
        )
        print()
        print(summary_table(result["rows"]))
    if result.get("projection"):
        print()
        print(PROJECTION_NOTE)
        print()
        print(projection_table(result["projection"]["rows"]))
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
