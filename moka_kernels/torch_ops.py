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
    """
    check_apply_args(x, y, token_slots, bank)
    if groups is None:
        groups = group_tokens(token_slots)
    for slot, idx in groups:
        whole = idx.numel() == x.shape[0]  # avoid gather/scatter when one adapter has it all
        xs = x if whole else x.index_select(0, idx)
        xs = xs.to(bank.dtype)
        delta = torch.zeros(xs.shape[0], bank.out_features, dtype=bank.dtype, device=x.device)
        for i in range(len(bank.entries[slot])):
            a, b, s = bank.factors(slot, i)
            xm = xs.view(-1, s.n1, s.n2)
            if a is None:
                ym = xm @ b.T
            elif s.a_first:
                ym = (a @ xm) @ b.T
            else:
                ym = a @ (xm @ b.T)
            delta[:, s.out_offset : s.out_offset + s.m1 * s.m2] += ym.reshape(xs.shape[0], -1)
        if whole:
            y += delta.to(y.dtype)
        else:
            y.index_add_(0, idx, delta.to(y.dtype))
