"""The CPU fast path: reshape-and-matmul over runs of tokens that share an adapter slot.

For the tokens ``idx`` of one slot and one entry with factors A (m1, n1) and B (m2, n2)::

    X = x[idx].view(T, n1, n2)
    Y = A @ (X @ B.T)          # or (A @ X) @ B.T, whichever is cheaper (bank.choose_a_first)
    y[idx, off:off + m1*m2] += Y.reshape(T, m1*m2)

Two batched GEMMs per entry, never the dense ``kron``; a low-rank entry (``bank``: a slice's
rank-1 components stacked) is ``(x @ V.T) @ U.T``, a LoRA's shrink and expand. Grouping happens
on the host; that is fine on CPU, where vLLM runs LoRA models eagerly. Tokens with slot -1 are
never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bank import CpuPack, MokaBank, check_apply_args, compute_dtype

# Batches up to this many tokens reuse preallocated gather/output buffers and cached views
# (decode steps); larger ones allocate per call, where the GEMMs dwarf the Python overhead.
PLAN_MAX_TOKENS = 64
# One adapter takes the gathered path only for this many tokens: beyond, copying its factors
# per token costs more (on Llama-3-8B shapes at 64 tokens) than multiplying them shared.
ONE_ADAPTER_GATHER_MAX_TOKENS = 16
# How a gathered entry multiplies (``_GatherPlan.entries``).
A_FIRST, B_FIRST, LOW_RANK = range(3)


def kron_matmul(
    xm: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor, a_first: bool
) -> torch.Tensor:
    """``A @ X @ B.T`` for ``X = xm`` of shape ``(T, n1, n2)``: ``(T, m1, m2)``.

    ``a is None`` means A is the identity. ``a``/``b`` are ``(m1, n1)``/``(m2, n2)``, or
    per-token stacks ``(T, m1, n1)``/``(T, m2, n2)``. ``a_first`` picks the association
    (``bank.choose_a_first``). Plain matmuls, so autograd flows through it (the trainer uses it).
    """
    if a is None:
        return torch.matmul(xm, b.mT)
    if a_first:
        return torch.matmul(torch.matmul(a, xm), b.mT)
    return torch.matmul(a, torch.matmul(xm, b.mT))


@dataclass(frozen=True)
class MixturePlan:
    """How :func:`mixture_matmul` computes one module's components (fixed by their shapes).

    Components whose A is a column (``n1 == 1``) with the same ``m1`` and ``m2`` go together as
    one LoRA-like pair of matmuls (r rank-1 components cost what a rank-r LoRA costs); the
    others are one :func:`kron_matmul` each, in the cheaper association ``a_first``.
    """

    column_groups: tuple[tuple[int, ...], ...]
    single: tuple[int, ...]
    a_first: tuple[bool, ...]


def mixture_plan(components, identity_a: bool) -> MixturePlan:
    """The plan for ``components`` (anything with ``m1, n1, m2, n2``)."""
    from .bank import choose_a_first

    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(components):
        if c.n1 == 1 and not identity_a:
            groups.setdefault((c.m1, c.m2), []).append(i)
    column_groups = tuple(tuple(g) for g in groups.values() if len(g) > 1)
    grouped = {i for g in column_groups for i in g}
    return MixturePlan(
        column_groups,
        tuple(i for i in range(len(components)) if i not in grouped),
        tuple(choose_a_first(c.m1, c.n1, c.m2, c.n2, identity_a) for c in components),
    )


def mixture_matmul(
    xf: torch.Tensor,
    components,
    a: list[torch.Tensor] | None,
    b: list[torch.Tensor],
    coeff: torch.Tensor,
    plan: MixturePlan,
) -> torch.Tensor:
    """``sum_i coeff_i kron(A_i, B_i) @ x`` for the rows of ``xf`` (T, in): (T, out).

    ``a`` None means every A is the identity (MoKAs). No Kronecker product is formed; plain
    matmuls, so autograd flows through it (the trainer and the PEFT tuner train with it).
    """
    t = xf.shape[0]
    out_features = components[0].m1 * components[0].m2
    out = None
    for group in plan.column_groups:
        # sum_i c_i kron(a_i, B_i) x  with a_i an (m1 x 1) column and B_i (m2 x in):
        # z = x @ [B_1; ...; B_k]^T, then out[:, p*m2 + q] = sum_i a_i[p] c_i z_i[q].
        m2 = components[group[0]].m2
        bs = torch.cat([b[i] for i in group])  # (k * m2, in)
        cols = torch.cat([a[i] for i in group], dim=1) * coeff[list(group)]  # (m1, k)
        z = xf @ bs.t()  # (t, k * m2)
        if m2 == 1:  # rank-1 components: exactly a LoRA's second matmul
            y = z @ cols.t()
        else:
            y = torch.matmul(cols, z.reshape(t, len(group), m2)).reshape(t, out_features)
        out = y if out is None else out + y
    for i in plan.single:
        c = components[i]
        ai = None if a is None else a[i]
        y = kron_matmul(xf.reshape(t, c.n1, c.n2), ai, b[i], plan.a_first[i])
        y = y.reshape(t, out_features) * coeff[i]
        out = y if out is None else out + y
    return out


def group_tokens(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(slot, token_indices), ...]`` for every slot >= 0 present, indices ascending."""
    if token_slots.numel() == 0:
        return []
    slots = token_slots.tolist()
    first = slots[0]
    if first >= 0 and all(s == first for s in slots):  # one adapter for the whole batch
        return [(first, torch.arange(len(slots), device=token_slots.device))]
    order = torch.argsort(token_slots, stable=True)
    sorted_slots = token_slots[order].tolist()
    groups = []
    start = 0
    for i in range(1, len(sorted_slots) + 1):
        if i == len(sorted_slots) or sorted_slots[i] != sorted_slots[start]:
            if sorted_slots[start] >= 0:
                groups.append((sorted_slots[start], order[start:i]))
            start = i
    return groups


@torch.no_grad()
def moka_apply_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    token_slots: torch.Tensor,
    bank: MokaBank,
    groups: list[tuple[int, torch.Tensor]] | None = None,
) -> None:
    """``y[t] += delta_W[slot[t]] @ x[t]`` for every token whose slot is not -1.

    ``groups`` is ``group_tokens(token_slots)``, computed once per model step by a caller that
    applies many layers to the same batch; computed here when omitted.

    Slots whose adapters have the same component shapes are applied together, with each token's
    factors gathered (Punica's BGMV idea): the number of torch ops then grows with the number
    of components, not with components times adapters, and on CPU ops cost more than flops.
    Small batches take that path even for one adapter (its reused buffers make it the cheapest
    in ops); one adapter over more than ``ONE_ADAPTER_GATHER_MAX_TOKENS`` tokens multiplies its
    shared factors directly (``_apply_one_slot``).
    """
    check_apply_args(x, y, token_slots, bank)
    if groups is None:
        groups = group_tokens(token_slots)
    by_shapes: dict[object, list[tuple[int, torch.Tensor]]] = {}
    for slot, idx in groups:
        if bank.entries[slot]:
            key = bank.cpu.shape_key[slot] if bank.cpu is not None else slot
            by_shapes.setdefault(key, []).append((slot, idx))
    for same_shapes in by_shapes.values():
        tokens = sum(idx.numel() for _, idx in same_shapes)
        if bank.cpu is not None and (
            len(same_shapes) > 1 or tokens <= ONE_ADAPTER_GATHER_MAX_TOKENS
        ):
            _apply_gathered(x, y, token_slots, same_shapes, bank)
        else:  # one adapter for many tokens: its factors are shared, GEMMs are large
            for slot, idx in same_shapes:
                _apply_one_slot(x, y, slot, idx, bank)


def _apply_one_slot(
    x: torch.Tensor, y: torch.Tensor, slot: int, idx: torch.Tensor, bank: MokaBank
) -> None:
    whole = idx.numel() == x.shape[0]  # one adapter has the whole batch: no gather/scatter
    # On CPU, half-precision banks multiply in float32 (see CpuPack.packed).
    dtype = compute_dtype(bank.dtype) if x.device.type == "cpu" else bank.dtype
    xs = (x if whole else x.index_select(0, idx)).to(bank.dtype).to(dtype)
    n = xs.shape[0]
    # Add straight into y when the batch is whole and dtypes agree; else into a buffer.
    direct = whole and y.dtype == dtype
    out = y if direct else torch.zeros(n, bank.out_features, dtype=dtype, device=x.device)
    for a, b, s in bank.slot_views(slot):
        a = None if a is None else a.to(dtype)
        xc = xs[:, s.in_offset : s.in_offset + s.n1 * s.n2]
        if s.low_rank:  # U @ (V @ x): a LoRA's shrink and expand
            ym = (xc @ b.to(dtype).t()) @ a.t()
        else:
            ym = kron_matmul(xc.view(n, s.n1, s.n2), a, b.to(dtype), s.a_first)
        out[:, s.out_offset : s.out_offset + s.m1 * s.m2].add_(ym.view(n, -1))
    if direct:
        return
    if whole:
        y.add_(out.to(y.dtype))
    else:
        y.index_add_(0, idx, out.to(y.dtype))


@dataclass
class _GatherPlan:
    """Views for applying one shape set to ``n`` gathered tokens, built once and reused.

    On CPU each torch call costs microseconds, as much as these tiny GEMMs: slicing the
    gathered factors into per-entry views on every call doubled the layer's time. The views
    point into ``gathered`` (each token's packed factors) and ``outs`` (one contiguous output
    buffer per touched slice, so GEMMs can write and accumulate into them in place).
    """

    gathered: torch.Tensor  # (n, packed width)
    # per entry: input columns, (n1, n2), A view (n, m1, n1) or None, B^T view (n, n2, m2),
    # the order (A_FIRST, B_FIRST or LOW_RANK), output view (n, m1, m2), whether it overwrites
    # its output (the first entry into a slice it covers whole) rather than accumulating. A
    # low-rank entry's views: x as (n, 1, in), U^T (n, r, m), V^T (n, in, r), output (n, 1, m).
    entries: list[
        tuple[slice, tuple[int, int], torch.Tensor | None, torch.Tensor, int, torch.Tensor, bool]
    ]
    outs: list[tuple[int, int, torch.Tensor]]  # (offset, width, (n, width) buffer) per slice
    zero_first: list[torch.Tensor]  # slice buffers whose first entry covers only part of them


def _scratch(
    cpu: CpuPack, widths: list[int], n: int, cached: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gather and per-slice output buffers with at least ``n`` rows.

    Cached ones are shared by every plan of the bank (groups of one call run one after the
    other, each done with the buffers before the next starts) and grow to the largest batch
    seen; growing drops the plans, whose views point into the old buffers.
    """
    width = cpu.packed.shape[1]
    if not cached:
        return cpu.packed.new_empty(n, width), [cpu.packed.new_empty(n, w) for w in widths]
    sc = cpu.plans.get("scratch")
    if sc is None or sc[0].shape[0] < n or sc[0].shape[1] != width:
        cpu.plans.clear()
        sc = _scratch(cpu, widths, n, cached=False)
        cpu.plans["scratch"] = sc
    return sc


def _gather_plan(bank: MokaBank, slot: int, n: int) -> _GatherPlan:
    """The plan for ``n`` tokens of slots shaped like ``slot`` (cached for small ``n``)."""
    cpu = bank.cpu
    cached = n <= PLAN_MAX_TOKENS
    key = (cpu.shape_key[slot], n)
    plan = cpu.plans.get(key) if cached else None
    if plan is not None:
        return plan
    gathered_rows, out_rows = _scratch(cpu, bank.slice_widths, n, cached)
    gathered = gathered_rows[:n]
    outs: dict[int, torch.Tensor] = {}
    zero_first = []
    entries = []
    pos = 0
    for s in bank.entries[slot]:  # factors as CpuPack stores them (bank.pack_factors)
        a = None
        (am, an), (bm, bn) = s.a_shape, s.b_shape
        if not s.identity_a:  # A (n, m1, n1), or U^T (n, r, m)
            a = gathered[:, pos : pos + am * an].view(n, *((an, am) if s.low_rank else (am, an)))
            pos += am * an
        if s.low_rank:  # V (n, r, in) -> V^T
            bt = gathered[:, pos : pos + bm * bn].view(n, bm, bn).mT
        else:  # B^T (n, n2, m2)
            bt = gathered[:, pos : pos + bm * bn].view(n, bn, bm)
        pos += bm * bn
        if s.low_rank:
            order, n12, out_shape = LOW_RANK, (1, s.n2), (1, s.m1)
        else:
            order, n12, out_shape = (A_FIRST if s.a_first else B_FIRST), (s.n1, s.n2), (s.m1, s.m2)
        first = s.slice not in outs
        if first:
            outs[s.slice] = out_rows[s.slice][:n]
        # Sharded entries (tensor parallelism) cover part of their slice.
        start = s.out_offset - bank.slice_offsets[s.slice]
        whole = start == 0 and s.m1 * s.m2 == bank.slice_widths[s.slice]
        if first and not whole:
            zero_first.append(outs[s.slice])
        dst = outs[s.slice][:, start : start + s.m1 * s.m2].view(n, *out_shape)
        cols = slice(s.in_offset, s.in_offset + s.n1 * s.n2)
        entries.append((cols, n12, a, bt, order, dst, first and whole))
    plan = _GatherPlan(
        gathered,
        entries,
        [(bank.slice_offsets[i], b.shape[1], b) for i, b in outs.items()],
        zero_first,
    )
    if cached:
        cpu.plans[key] = plan
    return plan


def _apply_gathered(
    x: torch.Tensor,
    y: torch.Tensor,
    token_slots: torch.Tensor,
    groups: list[tuple[int, torch.Tensor]],
    bank: MokaBank,
) -> None:
    """Several slots with identical component shapes: gather each token's factors, bmm.

    One copy gathers every factor of every token (``bank.cpu.packed``); each entry is then two
    batched matmuls writing or accumulating into its slice's buffer, and each touched slice is
    added to y once. When these slots cover the whole batch, tokens stay in place: no gather of
    x, no scatter into y.
    """
    whole = sum(i.numel() for _, i in groups) == x.shape[0]
    dtype = bank.cpu.packed.dtype  # float32 for half-precision banks (see CpuPack.packed)
    if whole:
        idx = None
        tok_slots = token_slots.long()
        xs = x.to(bank.dtype).to(dtype)
    else:
        idx = torch.cat([i for _, i in groups])
        tok_slots = torch.cat([torch.full_like(i, slot) for slot, i in groups])
        xs = x.index_select(0, idx).to(bank.dtype).to(dtype)
    n = xs.shape[0]
    plan = _gather_plan(bank, groups[0][0], n)
    torch.index_select(bank.cpu.packed, 0, tok_slots, out=plan.gathered)
    for out in plan.zero_first:
        out.zero_()
    for cols, n12, a, bt, order, dst, overwrite in plan.entries:
        xm = xs[:, cols].view(n, *n12)
        if a is None:
            p, q = xm, bt
        elif order == LOW_RANK:  # (x V^T) U^T
            p, q = torch.bmm(xm, bt), a
        elif order == A_FIRST:
            p, q = torch.bmm(a, xm), bt
        else:
            p, q = a, torch.bmm(xm, bt)
        if overwrite:
            torch.bmm(p, q, out=dst)
        else:
            dst.baddbmm_(p, q)
    for offset, width, out in plan.outs:
        dst_cols = y[:, offset : offset + width]
        if idx is None:
            dst_cols.add_(out.to(y.dtype))
        else:
            dst_cols.index_add_(0, idx, out.to(y.dtype))
