"""The ground truth: materialise ``kron(A, B)`` per token with ``torch.kron`` and multiply.

Slow on purpose and obviously right. It computes in float64 (or the input's dtype if that is
wider) and adds the result into ``y`` once, rounded to ``y``'s dtype. Same signature as every
fast path, so tests can swap one for the other.
"""

from __future__ import annotations

import torch

from .bank import MokaBank, check_apply_args


def delta_weight(bank: MokaBank, slot: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense ``(out, in)`` update of ``slot``: the sum of each entry's ``kron(A, B)`` in place."""
    delta = torch.zeros(bank.out_features, bank.in_features, dtype=dtype, device=bank.device)
    for i in range(len(bank.entries[slot])):
        # Views, some transposed (CpuPack): kron wants row-major copies (``contiguous`` keeps a
        # transposed (m, 1) column's strides, which it counts as contiguous).
        a, b, s = bank.factors(slot, i)
        b = b.to(dtype).clone(memory_format=torch.contiguous_format)
        a = torch.eye(s.m1, dtype=dtype, device=bank.device) if a is None else a.to(dtype)
        a = a.clone(memory_format=torch.contiguous_format)
        rows = slice(s.out_offset, s.out_offset + s.m1 * s.m2)
        cols = slice(s.in_offset, s.in_offset + s.n1 * s.n2)
        if s.rank > 1:  # a low-rank entry: the sum of its rank-1 Kronecker terms
            for j in range(s.rank):
                delta[rows, cols] += torch.kron(a[:, j : j + 1], b[j : j + 1])
        else:
            delta[rows, cols] += torch.kron(a, b)
    return delta


@torch.no_grad()
def moka_apply_naive(
    x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, bank: MokaBank
) -> None:
    """``y[t] += delta_W[slot[t]] @ x[t]`` for every token whose slot is not -1."""
    check_apply_args(x, y, token_slots, bank)
    wide = torch.float64 if x.dtype != torch.float64 else x.dtype
    deltas: dict[int, torch.Tensor] = {}
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        if slot not in deltas:
            deltas[slot] = delta_weight(bank, slot, wide)
        y[t] = (y[t].to(wide) + deltas[slot] @ x[t].to(wide)).to(y.dtype)
