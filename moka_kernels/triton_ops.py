"""Batched Triton kernel: many heterogeneous MoKA adapters applied to one batch in one launch.

Each program owns one *group* of tokens (up to ``BLOCK_T`` tokens that share an adapter slot,
consecutive in slot order) and one output slice. It walks every entry (mixture component) of
that slot on that slice and adds ``A @ X_t @ B.T`` into ``y`` for its tokens. One program owns
all components of its (tokens, slice) outputs, so no two programs write the same element: no
atomics, and results are deterministic.

Two forms, chosen from the batch's token->slot grouping (``form="auto"``):

* **decode** (``BLOCK_T = 1``): one program per token, so a batch of tokens that each use a
  different adapter runs fully in parallel.
* **prefill** (``BLOCK_T = 16``): a run of tokens sharing an adapter is processed as two GEMMs
  with the tokens folded into the GEMM dimensions: ``Z = X @ B.T`` with rows ``(token, j1)``,
  then ``A @ Z`` with columns ``(token, i2)`` (a reshape/permute in registers in between), so
  each factor tile is read once per 16 tokens.

The association ``A @ (X @ B.T)`` or ``(A @ X) @ B.T`` is chosen per entry when the adapter is
written (``bank.choose_a_first``); identity A factors (MoKAs) skip the second GEMM.

Low-rank entries (``bank``: a slice's rank-1 components stacked as ``U (m, r)``, ``V (r, n)``)
take a GEMV-shaped path instead of the Kronecker tiles, which would pad their 1-wide factors to
64 and recompute ``V @ x`` for every block of output rows: ``z = x @ V.T`` once over the input,
then ``y += z @ U.T`` block by block, the rank tiled by ``LOW_RANK_BLOCK_R``. Its token tile has
``LOW_RANK_T = 16`` rows (``tl.dot``'s minimum), of which the decode form uses one.

Under ``TRITON_INTERPRET=1`` (CPU) the interpreter's bf16 ``tl.dot`` returns garbage, so tiles are
cast to fp32 there. fp32 inputs use IEEE fp32 dots (no TF32) everywhere.

The launch is registered as the custom op ``moka_kernels::moka_apply`` (it mutates ``y``), so
``torch.compile`` treats it as opaque and CUDA graphs capture it: the grid depends only on the
number of tokens and slots, never on the data.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bank import NUM_FIELDS, MokaBank, check_apply_args

DECODE_BLOCK_T = 1
PREFILL_BLOCK_T = 16
# (BLOCK_1, BLOCK_2): tile sizes along the A-factor and B-factor dimensions, per form.
DECODE_BLOCKS = (64, 64)
PREFILL_BLOCKS = (16, 32)
# Low-rank entries: token rows per tile, rank columns per tile, input/output width per tile.
LOW_RANK_T = 16
LOW_RANK_BLOCK_R = 16
LOW_RANK_BLOCK_N = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, CAST_F32: tl.constexpr):
    if CAST_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))


@triton.jit
def _apply_b_first(
    xr_ptr, tr_mask, yc_ptr, tc_mask, a_base, b_base, m1, n1, m2, n2, ident, off,
    BLOCK_T: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, CAST_F32: tl.constexpr,
):  # fmt: skip
    """``Y = A @ (X @ B.T)`` for BLOCK_T tokens; rows of the Z tile are (token, j1)."""
    r1 = tl.arange(0, BLOCK_1)
    r2 = tl.arange(0, BLOCK_2)
    row_j = tl.arange(0, BLOCK_T * BLOCK_1) % BLOCK_1  # Z-tile row -> j1 within the block
    col_i = tl.arange(0, BLOCK_T * BLOCK_2) % BLOCK_2  # Y-tile column -> i2 within the block
    for i1_0 in range(0, m1, BLOCK_1):
        i1 = i1_0 + r1
        # With an identity A, Y = Z restricted to j1 = i1: one j1 block, no second GEMM.
        j1_start = tl.where(ident != 0, i1_0, 0)
        j1_stop = tl.where(ident != 0, i1_0 + 1, n1)
        for i2_0 in range(0, m2, BLOCK_2):
            i2 = i2_0 + r2
            acc = tl.zeros((BLOCK_1, BLOCK_T * BLOCK_2), dtype=tl.float32)
            for j1_0 in range(j1_start, j1_stop, BLOCK_1):
                j1 = j1_0 + row_j
                z = tl.zeros((BLOCK_T * BLOCK_1, BLOCK_2), dtype=tl.float32)
                for j2_0 in range(0, n2, BLOCK_2):
                    j2 = j2_0 + r2
                    x_tile = tl.load(
                        xr_ptr[:, None] + (j1 * n2)[:, None] + j2[None, :],
                        mask=(tr_mask & (j1 < n1))[:, None] & (j2 < n2)[None, :],
                        other=0.0,
                    )
                    bt_tile = tl.load(
                        b_base + i2[None, :] * n2 + j2[:, None],
                        mask=(j2 < n2)[:, None] & (i2 < m2)[None, :],
                        other=0.0,
                    )
                    z += _dot(x_tile, bt_tile, CAST_F32)
                z = tl.reshape(z, (BLOCK_T, BLOCK_1, BLOCK_2))
                z = tl.reshape(tl.permute(z, (1, 0, 2)), (BLOCK_1, BLOCK_T * BLOCK_2))
                if ident != 0:
                    acc += z
                else:
                    a_tile = tl.load(
                        a_base + i1[:, None] * n1 + (j1_0 + r1)[None, :],
                        mask=(i1 < m1)[:, None] & ((j1_0 + r1) < n1)[None, :],
                        other=0.0,
                    )
                    acc += _dot(a_tile, z, CAST_F32)
            out_i2 = i2_0 + col_i
            y_ptrs = yc_ptr[None, :] + off + i1[:, None] * m2 + out_i2[None, :]
            y_mask = (i1 < m1)[:, None] & (tc_mask & (out_i2 < m2))[None, :]
            y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=y_mask)


@triton.jit
def _apply_a_first(
    xc_ptr, tc_mask, yr_ptr, tr_mask, a_base, b_base, m1, n1, m2, n2, off,
    BLOCK_T: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, CAST_F32: tl.constexpr,
):  # fmt: skip
    """``Y = (A @ X) @ B.T`` for BLOCK_T tokens; columns of the W tile are (token, j2)."""
    r1 = tl.arange(0, BLOCK_1)
    r2 = tl.arange(0, BLOCK_2)
    col_j = tl.arange(0, BLOCK_T * BLOCK_2) % BLOCK_2  # W-tile column -> j2 within the block
    row_i = tl.arange(0, BLOCK_T * BLOCK_1) % BLOCK_1  # Y-tile row -> i1 within the block
    for i1_0 in range(0, m1, BLOCK_1):
        i1 = i1_0 + r1
        for i2_0 in range(0, m2, BLOCK_2):
            i2 = i2_0 + r2
            acc = tl.zeros((BLOCK_T * BLOCK_1, BLOCK_2), dtype=tl.float32)
            for j2_0 in range(0, n2, BLOCK_2):
                j2 = j2_0 + col_j
                w = tl.zeros((BLOCK_1, BLOCK_T * BLOCK_2), dtype=tl.float32)
                for j1_0 in range(0, n1, BLOCK_1):
                    j1 = j1_0 + r1
                    a_tile = tl.load(
                        a_base + i1[:, None] * n1 + j1[None, :],
                        mask=(i1 < m1)[:, None] & (j1 < n1)[None, :],
                        other=0.0,
                    )
                    x_tile = tl.load(
                        xc_ptr[None, :] + (j1 * n2)[:, None] + j2[None, :],
                        mask=(j1 < n1)[:, None] & (tc_mask & (j2 < n2))[None, :],
                        other=0.0,
                    )
                    w += _dot(a_tile, x_tile, CAST_F32)
                w = tl.reshape(w, (BLOCK_1, BLOCK_T, BLOCK_2))
                w = tl.reshape(tl.permute(w, (1, 0, 2)), (BLOCK_T * BLOCK_1, BLOCK_2))
                bt_tile = tl.load(
                    b_base + i2[None, :] * n2 + (j2_0 + r2)[:, None],
                    mask=((j2_0 + r2) < n2)[:, None] & (i2 < m2)[None, :],
                    other=0.0,
                )
                acc += _dot(w.to(bt_tile.dtype), bt_tile, CAST_F32)
            out_i1 = i1_0 + row_i
            y_ptrs = yr_ptr[:, None] + off + (out_i1 * m2)[:, None] + i2[None, :]
            y_mask = (tr_mask & (out_i1 < m1))[:, None] & (i2 < m2)[None, :]
            y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=y_mask)


@triton.jit
def _apply_low_rank(
    x_rows, t_mask, y_rows, a_base, b_base, m, n, rank, off,
    LR_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, CAST_F32: tl.constexpr,
):  # fmt: skip
    """``Y = (X @ V.T) @ U.T`` for up to ``LR_T`` tokens: ``x_rows``/``y_rows`` point at each
    token's first input column and its output row; ``U`` is ``(m, rank)``, ``V`` ``(rank, n)``."""
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + rr
        z = tl.zeros((LR_T, BLOCK_R), dtype=tl.float32)
        for j0 in range(0, n, BLOCK_N):
            j = j0 + rn
            x_tile = tl.load(
                x_rows[:, None] + j[None, :], mask=t_mask[:, None] & (j < n)[None, :], other=0.0
            )
            vt_tile = tl.load(
                b_base + r[None, :] * n + j[:, None],
                mask=(j < n)[:, None] & (r < rank)[None, :],
                other=0.0,
            )
            z += _dot(x_tile, vt_tile, CAST_F32)
        for i0 in range(0, m, BLOCK_N):
            i = i0 + rn
            ut_tile = tl.load(
                a_base + i[None, :] * rank + r[:, None],
                mask=(r < rank)[:, None] & (i < m)[None, :],
                other=0.0,
            )
            acc = _dot(z.to(ut_tile.dtype), ut_tile, CAST_F32)
            y_ptrs = y_rows[:, None] + off + i[None, :]
            y_mask = t_mask[:, None] & (i < m)[None, :]
            y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=y_mask)


@triton.jit
def _moka_kernel(
    x_ptr, y_ptr, sorted_tok_ptr, sorted_slot_ptr, group_start_ptr,
    pool_ptr, table_ptr, num_tokens,
    stride_xt, stride_yt, stride_ts, stride_te,
    NUM_ENTRIES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr, CAST_F32: tl.constexpr, LR_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    start = tl.load(group_start_ptr + tl.program_id(0))
    slice_id = tl.program_id(1)
    if start >= num_tokens:
        return
    slot = tl.load(sorted_slot_ptr + start).to(tl.int64)
    if slot < 0:
        return
    # Per-row and per-column views of the group's tokens: tile rows are (token, BLOCK_1 index),
    # tile columns are (token, BLOCK_2 index). A position belongs to this group while it is
    # inside the batch and still carries this slot.
    rt = start + tl.arange(0, BLOCK_T * BLOCK_1) // BLOCK_1
    tr_in = rt < num_tokens
    tr_mask = tr_in & (tl.load(sorted_slot_ptr + rt, mask=tr_in, other=-1) == slot)
    tok_r = tl.load(sorted_tok_ptr + rt, mask=tr_mask, other=0).to(tl.int64)
    ct = start + tl.arange(0, BLOCK_T * BLOCK_2) // BLOCK_2
    tc_in = ct < num_tokens
    tc_mask = tc_in & (tl.load(sorted_slot_ptr + ct, mask=tc_in, other=-1) == slot)
    tok_c = tl.load(sorted_tok_ptr + ct, mask=tc_mask, other=0).to(tl.int64)
    # The low-rank path's token rows: the group's BLOCK_T tokens in a tile of LR_T rows.
    lr = tl.arange(0, LR_T)
    lt = start + lr
    lt_in = (lr < BLOCK_T) & (lt < num_tokens)
    lt_mask = lt_in & (tl.load(sorted_slot_ptr + lt, mask=lt_in, other=-1) == slot)
    tok_l = tl.load(sorted_tok_ptr + lt, mask=lt_mask, other=0).to(tl.int64)

    for e in range(NUM_ENTRIES):
        row = table_ptr + slot * stride_ts + e * stride_te
        m1 = tl.load(row + 0)
        if (m1 > 0) & (tl.load(row + 7) == slice_id):
            n1 = tl.load(row + 1)
            m2 = tl.load(row + 2)
            n2 = tl.load(row + 3)
            ident = tl.load(row + 4)
            a_first = tl.load(row + 5)
            off = tl.load(row + 6)
            x_col = tl.load(row + 8)  # the entry's first input column
            a_base = pool_ptr + tl.load(row + 9).to(tl.int64)  # where A and B start in the pool
            b_base = pool_ptr + tl.load(row + 10).to(tl.int64)
            if (n1 == 1) & (m2 == 1) & (ident == 0):  # low-rank: U (m1, rank), V (rank, n2)
                _apply_low_rank(
                    x_ptr + tok_l * stride_xt + x_col, lt_mask, y_ptr + tok_l * stride_yt,
                    a_base, b_base, m1, n2, tl.load(row + 11), off,
                    LR_T, BLOCK_R, BLOCK_N, CAST_F32,
                )  # fmt: skip
            elif a_first != 0:
                _apply_a_first(
                    x_ptr + tok_c * stride_xt + x_col, tc_mask, y_ptr + tok_r * stride_yt, tr_mask,
                    a_base, b_base, m1, n1, m2, n2, off, BLOCK_T, BLOCK_1, BLOCK_2, CAST_F32,
                )  # fmt: skip
            else:
                _apply_b_first(
                    x_ptr + tok_r * stride_xt + x_col, tr_mask, y_ptr + tok_c * stride_yt, tc_mask,
                    a_base, b_base, m1, n1, m2, n2, ident, off,
                    BLOCK_T, BLOCK_1, BLOCK_2, CAST_F32,
                )  # fmt: skip


class TritonPlan(NamedTuple):
    """The token grouping of one batch, shared by every layer of a model step."""

    sorted_token_ids: torch.Tensor
    sorted_slots: torch.Tensor
    group_starts: torch.Tensor
    block_t: int


def make_plan(token_slots: torch.Tensor, num_slots: int, form: str = "auto") -> TritonPlan:
    """Group a batch's tokens for the kernel; ``form`` is "auto", "decode" or "prefill"."""
    if form == "auto":
        block_t = choose_block_t(token_slots.shape[0], num_slots)
    elif form in ("decode", "prefill"):
        block_t = DECODE_BLOCK_T if form == "decode" else PREFILL_BLOCK_T
    else:
        raise ValueError(f"unknown form {form!r}: use 'auto', 'decode' or 'prefill'")
    return TritonPlan(*group_starts(token_slots, block_t, num_slots), block_t)


def group_starts(
    token_slots: torch.Tensor, block_t: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort tokens by slot and cut each slot's run into groups of at most ``block_t`` tokens.

    Returns ``(sorted_token_ids, sorted_slots, group_starts)``. ``group_starts`` has a fixed
    length that depends only on the token count and ``num_slots`` (a bound on the number of
    groups); unused entries hold ``num_tokens``, and their programs exit at once. Nothing here
    synchronises with the device, so the whole op can be captured in a CUDA graph.
    """
    n = token_slots.shape[0]
    # -1 (no adapter) sorts last, so every prefix of the sorted order that covers the adapted
    # tokens is a valid plan for that many tokens (``MokaKernelMeta.triton_plan`` relies on it).
    keys = torch.where(token_slots < 0, num_slots, token_slots)
    order = torch.sort(keys, stable=True).indices
    sorted_slots = token_slots[order]
    order = order.to(torch.int32)
    if block_t == 1:
        return order, sorted_slots, torch.arange(n, dtype=torch.int32, device=token_slots.device)
    pos = torch.arange(n, device=token_slots.device)
    new_run = torch.ones(n, dtype=torch.bool, device=token_slots.device)
    new_run[1:] = sorted_slots[1:] != sorted_slots[:-1]
    run_start = torch.cummax(torch.where(new_run, pos, 0), 0).values
    is_start = (pos - run_start) % block_t == 0
    group_index = torch.cumsum(is_start, 0) - 1
    bound = max_groups(n, block_t, num_slots)
    starts = torch.full((bound + 1,), n, dtype=torch.int32, device=token_slots.device)
    starts.scatter_(0, torch.where(is_start, group_index, bound), pos.to(torch.int32))
    return order, sorted_slots, starts[:bound]


def max_groups(num_tokens: int, block_t: int, num_slots: int) -> int:
    """A bound on the groups of ``num_tokens`` tokens: each distinct slot value (at most
    ``num_slots``, plus -1) adds at most one partial group."""
    return triton.cdiv(num_tokens, block_t) + num_slots + 1


def choose_block_t(num_tokens: int, num_slots: int) -> int:
    """Prefill form when runs are long even if every slot is in use, else decode form.

    Depends only on sizes, never on data, so the choice is stable under CUDA-graph capture.
    """
    if num_tokens >= 2 * PREFILL_BLOCK_T * (num_slots + 1):
        return PREFILL_BLOCK_T
    return DECODE_BLOCK_T


@torch.library.custom_op("moka_kernels::moka_apply", mutates_args={"y"})
def _moka_apply_op(
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    sorted_slots: torch.Tensor,
    starts: torch.Tensor,
    pool: torch.Tensor,
    table: torch.Tensor,
    num_slices: int,
    block_t: int,
    block_1: int,
    block_2: int,
) -> None:
    n = x.shape[0]
    if n == 0:
        return
    cast_f32 = interpreting() or x.dtype == torch.float32 or pool.dtype == torch.float32
    grid = (starts.shape[0], num_slices)
    _moka_kernel[grid](
        x, y, order, sorted_slots, starts, pool, table, n,
        x.stride(0), y.stride(0), table.stride(0), table.stride(1),
        NUM_ENTRIES=table.shape[1], BLOCK_T=block_t, BLOCK_1=block_1, BLOCK_2=block_2,
        CAST_F32=cast_f32, LR_T=LOW_RANK_T, BLOCK_R=LOW_RANK_BLOCK_R, BLOCK_N=LOW_RANK_BLOCK_N,
    )  # fmt: skip


@_moka_apply_op.register_fake
def _(x, y, order, sorted_slots, starts, pool, table, num_slices, block_t, block_1, block_2):
    return None


def moka_apply_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    token_slots: torch.Tensor,
    bank: MokaBank,
    form: str = "auto",
    blocks: tuple[int, int] | None = None,
    plan: TritonPlan | None = None,
) -> None:
    """``y[t] += delta_W[slot[t]] @ x[t]`` for every token whose slot is not -1.

    ``form`` is ``"auto"``, ``"decode"`` or ``"prefill"``; ``blocks`` overrides the
    ``(BLOCK_1, BLOCK_2)`` tile sizes (powers of two, at least 16). ``plan`` is
    ``make_plan(token_slots, bank.num_slots, form)``, computed once per model step by a caller
    that applies many layers to one batch; computed here when omitted.
    """
    check_apply_args(x, y, token_slots, bank)
    if bank.pool is None:
        raise ValueError("the Triton kernel reads the bank's pool: build it with pooled=True")
    if y.stride(1) != 1:
        raise ValueError("y must be contiguous along its last dimension (it is written in place)")
    if plan is None:
        plan = make_plan(token_slots, bank.num_slots, form)
    if blocks is None:
        blocks = DECODE_BLOCKS if plan.block_t == DECODE_BLOCK_T else PREFILL_BLOCKS
    x = x.to(bank.dtype).contiguous()
    torch.ops.moka_kernels.moka_apply(
        x, y, *plan[:3], bank.pool, bank.table, bank.num_slices, plan.block_t, *blocks
    )


assert NUM_FIELDS == 12  # the kernel reads table fields 0..11 by position
