"""The CPU fast path: reshape-and-matmul over runs of tokens that share an adapter slot.

For the tokens ``idx`` of one slot and one entry with factors A (m1, n1) and B (m2, n2)::

    X = x[idx].view(T, n1, n2)
    Y = A @ (X @ B.T)          # or (A @ X) @ B.T, whichever is cheaper (bank.choose_a_first)
    y[idx, off:off + m1*m2] += Y.reshape(T, m1*m2)

Two batched GEMMs per entry, never the dense ``kron``. Grouping happens on the host; that is
fine on CPU, where vLLM runs LoRA models eagerly. Tokens with slot -1 are never touched.
"""

from __future__ import annotations

import torch

from .bank import MokaBank, check_apply_args


def kron_matmul(
    xm: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor, a_first: bool
) -> torch.Tensor:
    """``A @ X @ B.T`` for ``X = xm`` of shape ``(T, n1, n2)``: ``(T, m1, m2)``.

    ``a is None`` means A is the identity. ``a``/``b`` are ``(m1, n1)``/``(m2, n2)``, or
    per-token stacks ``(T, m1, n1)``/``(T, m2, n2)``. ``a_first`` picks the association
    (``bank.choose_a_first``). Plain matmuls, so autograd flows through it (the trainer uses it).
    """
    # Per-token stacks take torch.bmm: matmul's broadcasting costs as much as these tiny GEMMs.
    mm = torch.bmm if b.dim() == 3 and xm.dim() == 3 else torch.matmul
    if a is None:
        return mm(xm, b.mT)
    if a_first:
        return mm(mm(a, xm), b.mT)
    return mm(a, mm(xm, b.mT))


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
    """
    check_apply_args(x, y, token_slots, bank)
    if groups is None:
        groups = group_tokens(token_slots)
    by_shapes: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for slot, idx in groups:
        if bank.entries[slot]:
            by_shapes.setdefault(bank.shape_key[slot], []).append((slot, idx))
    for same_shapes in by_shapes.values():
        if len(same_shapes) == 1 or bank.device.type != "cpu":
            for slot, idx in same_shapes:
                _apply_one_slot(x, y, slot, idx, bank)
        else:
            _apply_gathered(x, y, token_slots, same_shapes, bank)


def _apply_one_slot(
    x: torch.Tensor, y: torch.Tensor, slot: int, idx: torch.Tensor, bank: MokaBank
) -> None:
    whole = idx.numel() == x.shape[0]  # one adapter has the whole batch: no gather/scatter
    xs = (x if whole else x.index_select(0, idx)).to(bank.dtype)
    n = xs.shape[0]
    # Add straight into y when the batch is whole and dtypes agree; else into a buffer.
    direct = whole and y.dtype == bank.dtype
    out = y if direct else torch.zeros(n, bank.out_features, dtype=bank.dtype, device=x.device)
    for a, b, s in bank.views[slot]:
        ym = kron_matmul(xs.view(n, s.n1, s.n2), a, b, s.a_first)
        out[:, s.out_offset : s.out_offset + s.m1 * s.m2].add_(ym.view(n, -1))
    if direct:
        return
    if whole:
        y.add_(out.to(y.dtype))
    else:
        y.index_add_(0, idx, out.to(y.dtype))


def _apply_gathered(
    x: torch.Tensor,
    y: torch.Tensor,
    token_slots: torch.Tensor,
    groups: list[tuple[int, torch.Tensor]],
    bank: MokaBank,
) -> None:
    """Several slots with identical component shapes: gather each token's factors, bmm.

    One copy gathers every factor of every token (``bank.packed``); each entry is then two
    batched matmuls and one add into the output slice. When these
    slots cover the whole batch, tokens stay in place: no gather of x, no scatter into y.
    """
    n_all = x.shape[0]
    whole = sum(i.numel() for _, i in groups) == n_all
    if whole:
        idx = None
        tok_slots = token_slots.long()
        xs = x.to(bank.dtype)
    else:
        idx = torch.cat([i for _, i in groups])
        tok_slots = torch.cat([torch.full_like(i, slot) for slot, i in groups])
        xs = x.index_select(0, idx).to(bank.dtype)
    n = xs.shape[0]
    total = bank.packed_numel[groups[0][0]]
    packed = bank.packed[:, :total].index_select(0, tok_slots)
    direct = whole and y.dtype == bank.dtype
    out = y if direct else torch.zeros(n, bank.out_features, dtype=bank.dtype, device=x.device)
    pos = 0
    for s in bank.entries[groups[0][0]]:
        a = None
        if not s.identity_a:
            a = packed[:, pos : pos + s.m1 * s.n1].view(n, s.m1, s.n1)
            pos += s.m1 * s.n1
        b = packed[:, pos : pos + s.m2 * s.n2].view(n, s.m2, s.n2)
        pos += s.m2 * s.n2
        xm = xs.view(n, s.n1, s.n2)
        dst = out[:, s.out_offset : s.out_offset + s.m1 * s.m2].view(n, s.m1, s.m2)
        # bmm then add: an in-place baddbmm_ into a strided slice of y loops over the batch.
        dst.add_(kron_matmul(xm, a, b, s.a_first))
    if direct:
        return
    if idx is None:
        y.add_(out.to(y.dtype))
    else:
        y.index_add_(0, idx, out.to(y.dtype))
