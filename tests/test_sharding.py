"""Tensor-parallel shards of Kronecker terms, against the unsharded float64 ``torch.kron``.

For random factor shapes, most of them not aligned with the shard boundaries (``m2`` or ``n2``
not dividing a rank's share, ``1 x n`` and ``n x 1`` factors, identity A factors), every rank's
entries, written to a bank of the rank's local size, must give exactly the rank's block of the
full update; summed over the ranks (row-parallel) they give the full product. Each kernel
(naive, torch, Triton) applies sharded entries like any others.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from moka_kernels import KronEntry, MokaBank, delta_weight, moka_apply_naive, moka_apply_torch
from moka_kernels.bank import group_rank_one
from moka_kernels.sharding import LayerShard, block_pieces, shard_delta

WIDTH, IN = 48, 72  # divisible by 2, 3 and 4; many factorisations
FACTORS = {
    24: [(1, 24), (24, 1), (4, 6), (6, 4), (3, 8), (8, 3), (12, 2)],
    48: [(1, 48), (48, 1), (4, 12), (12, 4), (6, 8), (16, 3), (3, 16), (24, 2)],
    72: [(1, 72), (72, 1), (8, 9), (9, 8), (6, 12), (36, 2), (2, 36), (24, 3)],
}


def random_term(rng: random.Random, gen: torch.Generator, width: int, in_f: int, identity: bool):
    m1, m2 = rng.choice(FACTORS[width])
    if identity:  # A = I_k: n1 = m1 = k
        n1 = m1
        n2 = in_f // m1 if in_f % m1 == 0 else None
        if n2 is None:
            return None
        a = None
    else:
        n1, n2 = rng.choice(FACTORS[in_f])
        a = torch.randn(m1, n1, generator=gen, dtype=torch.float64)
    b = torch.randn(m2, n2, generator=gen, dtype=torch.float64)
    return KronEntry(b=b, a=a)


def full_delta(entries: list[KronEntry], widths: list[int], in_f: int) -> torch.Tensor:
    bank = MokaBank(1, len(entries), in_f * max(widths), in_f * max(widths), in_f, sum(widths),
                    torch.float64, "cpu", widths)  # fmt: skip
    bank.write_slot(0, entries)
    return delta_weight(bank, 0)


def rank_bank(shard: LayerShard, entries: list[KronEntry]) -> MokaBank:
    local = [e2 for e in entries for e2 in shard.shard(e)]
    numel = shard.in_features * max(shard.slice_widths)
    bank = MokaBank(2, max(len(local), 1), numel, numel, shard.local_in_features,
                    sum(shard.local_slice_widths), torch.float64, "cpu",
                    shard.local_slice_widths)  # fmt: skip
    bank.write_slot(0, local)
    return bank


def column_shards(tp: int, widths: list[int], in_f: int) -> list[LayerShard]:
    return [
        LayerShard(
            in_f, tuple(widths), tuple(((r * w // tp, w // tp),) for w in widths), (0, in_f)
        )  # fmt: skip
        for r in range(tp)
    ]


def row_shards(tp: int, widths: list[int], in_f: int) -> list[LayerShard]:
    share = in_f // tp
    return [
        LayerShard(in_f, tuple(widths), tuple(((0, w),) for w in widths), (r * share, share))
        for r in range(tp)
    ]


def test_block_pieces_cover_the_range_in_order():
    for block in (1, 3, 4, 7, 12):
        for start in range(0, 30):
            for stop in range(start, 31):
                pieces = block_pieces(start, stop, block)
                assert len(pieces) <= 3
                got = [
                    o * block + i
                    for o0, o1, i0, i1, _ in pieces
                    for o in range(o0, o1)
                    for i in range(i0, i1)
                ]
                assert got == list(range(start, stop))
                pos = 0
                for o0, o1, i0, i1, p in pieces:
                    assert p == pos
                    pos += (o1 - o0) * (i1 - i0)


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("seed", range(6))
def test_rank_blocks_equal_the_unsharded_kron(tp, kind, seed):
    rng = random.Random(seed * 31 + tp)
    gen = torch.Generator().manual_seed(seed)
    widths = [WIDTH, WIDTH // 2 if kind == "column" else WIDTH]  # two slices (merged layer)
    widths = widths[: 1 + seed % 2]
    entries = []
    for s, w in enumerate(widths):
        for c in range(3):
            term = random_term(rng, gen, w, IN, identity=c == 2)
            if term is not None:
                entries.append(KronEntry(b=term.b, a=term.a, slice=s))
        for _ in range(1 + seed % 3):  # rank-1 terms, as moka-train's mixed family has
            u = torch.randn(w, 1, generator=gen, dtype=torch.float64)
            entries.append(
                KronEntry(b=torch.randn(1, IN, generator=gen, dtype=torch.float64), a=u, slice=s)
            )
    full = full_delta(entries, widths, IN)
    if seed % 2:  # the server's form: each slice's rank-1 terms as one low-rank entry
        entries = group_rank_one(entries)
        assert any(e.rank > 1 for e in entries) or seed % 3 == 0
        assert torch.allclose(full_delta(entries, widths, IN), full, atol=1e-12)
    shards = (column_shards if kind == "column" else row_shards)(tp, widths, IN)
    x = torch.randn(5, IN, generator=gen, dtype=torch.float64)
    total = torch.zeros(5, sum(widths), dtype=torch.float64)
    for shard in shards:
        bank = rank_bank(shard, entries)
        assert torch.allclose(delta_weight(bank, 0), shard_delta(shard, full), atol=1e-12)
        pieces = sum(len(shard.shard(e)) for e in entries)
        assert pieces <= sum(shard.max_pieces(e.slice) for e in entries)
        if kind == "row":  # partial sums, added by the all-reduce
            y = torch.zeros(5, sum(widths), dtype=torch.float64)
            start, length = shard.cols
            moka_apply_naive(
                x[:, start : start + length], y, torch.zeros(5, dtype=torch.long), bank
            )
            total += y
    if kind == "row":
        assert torch.allclose(total, x @ full.T, atol=1e-10)


def test_fused_layer_rows_in_local_order_and_identity_pieces():
    """A fused qkv checkpoint module: one slice, a q, a k and a v run per rank (GQA widths),
    with an identity A whose k does not align with the runs."""
    gen = torch.Generator().manual_seed(3)
    in_f, q, kv, tp = 24, 24, 12, 2
    width = q + 2 * kv
    entries = [
        KronEntry(b=torch.randn(6, 3, generator=gen, dtype=torch.float64)),  # I_8 (x) B
        KronEntry(
            b=torch.randn(16, 4, generator=gen, dtype=torch.float64),
            a=torch.randn(3, 6, generator=gen, dtype=torch.float64),
        ),
    ]
    full = full_delta(entries, [width], in_f)
    for r in range(tp):
        rows = (
            (r * q // tp, q // tp),
            (q + r * kv // tp, kv // tp),
            (q + kv + r * kv // tp, kv // tp),
        )
        shard = LayerShard(in_f, (width,), (rows,), (0, in_f))
        bank = rank_bank(shard, entries)
        assert torch.allclose(delta_weight(bank, 0), shard_delta(shard, full), atol=1e-12)


def test_adjacent_runs_merge_so_an_unsharded_fused_layer_is_whole():
    shard = LayerShard(24, (48,), (((0, 24), (24, 12), (36, 12)),), (0, 24))
    assert shard.rows == (((0, 48),),) and shard.is_whole and shard.max_pieces(0) == 1


def test_whole_shard_returns_the_term_itself():
    e = KronEntry(b=torch.ones(4, 6), a=torch.ones(12, 12))
    assert LayerShard.unsharded(72, [48]).shard(e) == [e]


def test_terms_that_do_not_cover_the_layer_are_refused():
    shard = column_shards(2, [48], 72)[0]
    with pytest.raises(ValueError, match="does not cover"):
        shard.shard(KronEntry(b=torch.ones(4, 6), a=torch.ones(6, 12)))


def _cast(e: KronEntry, dtype: torch.dtype) -> KronEntry:
    return dataclasses.replace(e, b=e.b.to(dtype), a=None if e.a is None else e.a.to(dtype))


def _sharded_banks(dtype, device):
    """Two rank banks (column and row parallel) holding sharded adapters in 3 slots."""
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    banks = []
    for shard in (column_shards(3, [WIDTH], IN)[1], row_shards(3, [WIDTH], IN)[2]):
        per_slot = []
        for _ in range(3):
            terms = (random_term(rng, gen, WIDTH, IN, identity=c == 1) for c in range(3))
            entries = [t for t in terms if t is not None]
            per_slot.append([piece for e in entries for piece in shard.shard(e)])
        max_e = max(len(p) for p in per_slot)
        numel = max(t.numel() for p in per_slot for e in p for t in (e.a, e.b) if t is not None)
        widths = shard.local_slice_widths
        bank = MokaBank(
            4, max_e, numel, numel, shard.local_in_features, sum(widths), dtype, device, widths,
            pooled=True,
        )  # fmt: skip
        for slot, entries in enumerate(per_slot):
            bank.write_slot(slot, [_cast(e, dtype) for e in entries])
        banks.append(bank)
    return banks


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_kernels_apply_sharded_entries(impl, num_tokens):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "triton":
        triton_ops = pytest.importorskip("moka_kernels.triton_ops")
        if device == "cpu" and not triton_ops.interpreting():
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    dtype = torch.float32
    gen = torch.Generator().manual_seed(num_tokens)
    for bank in _sharded_banks(dtype, device):
        slots = torch.tensor([(i * 3) % 5 - 1 for i in range(num_tokens)])  # -1..3
        x = torch.randn(num_tokens, bank.in_features, generator=gen).to(device)
        y0 = torch.randn(num_tokens, bank.out_features, generator=gen).to(device)
        want = y0.double().clone()
        moka_apply_naive(x.double(), want, slots.to(device), bank)
        y = y0.clone()
        if impl == "torch":
            moka_apply_torch(x, y, slots.to(device), bank)
        else:
            from moka_kernels.triton_ops import moka_apply_triton

            moka_apply_triton(x, y, slots.to(device), bank)
        assert torch.allclose(y.double(), want, atol=1e-4, rtol=1e-4)
        assert set(slots.tolist()) >= {0, 1, 2} or num_tokens < 3
        untouched = (slots < 0) | (slots == 3)
        assert torch.equal(y[untouched.to(device)], y0[untouched.to(device)])
