"""Per-slot factor buffers for one linear layer: the data every MoKA kernel reads.

A serving engine keeps a fixed number of adapter *slots* per layer (vLLM's ``max_loras``). Each
slot holds the folded Kronecker factors of one adapter for this layer: a list of *entries*, one
per (output slice, component). Buffers are preallocated once and written in place, so that a
CUDA graph captured over the kernel stays valid when adapters are swapped.

Layout (S slots, E entries per slot):

* ``a``: ``(S, E, max_a_numel)``, entry e's A factor flattened row-major, zero padded.
* ``b``: ``(S, E, max_b_numel)``, entry e's B factor flattened row-major, zero padded.
* ``table``: int32 ``(S, E, NUM_FIELDS)``, one row per entry: the fields named below. ``M1 == 0``
  marks an unused entry.

The layer's output is split into *slices* (one slice for a plain linear layer; q, k and v of a
fused qkv projection), fixed when the bank is built. One entry adds ``kron(A, B) @ x[cols]`` (or
``kron(I_k, B) @ x[cols]`` when A is the identity) into ``m1*m2`` consecutive rows of its slice,
reading ``n1*n2`` consecutive input columns. An unsharded component covers its whole slice and
every input column; under tensor parallelism a component becomes a few entries that each cover
part of a rank's rows or columns (``moka_kernels.sharding``). The components of a mixture are
several entries on the same slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Column indices of ``MokaBank.table``.
M1, N1, M2, N2, IDENTITY_A, A_FIRST, OUT_OFFSET, SLICE, IN_OFFSET = range(9)
NUM_FIELDS = 9


@dataclass(frozen=True)
class KronEntry:
    """One folded Kronecker term of one output slice.

    ``y[:, rows] += kron(A, B) @ x[:, cols]`` with ``rows`` the ``m1*m2`` rows of slice ``slice``
    from ``out_offset`` (relative to the slice's start) and ``cols`` the ``n1*n2`` input columns
    from ``in_offset``. ``a is None`` means A is the identity ``I_k`` (the MoKAs variant), never
    materialised; ``k`` is ``identity_size``, or ``in_features // b.shape[1]`` when None.
    """

    b: torch.Tensor
    a: torch.Tensor | None = None
    slice: int = 0
    out_offset: int = 0
    in_offset: int = 0
    identity_size: int | None = None


@dataclass(frozen=True)
class EntryShape:
    """Host-side copy of one table row, so CPU code never syncs on ``table``."""

    m1: int
    n1: int
    m2: int
    n2: int
    identity_a: bool
    a_first: bool
    out_offset: int  # absolute: the slice's offset plus the entry's own
    slice: int
    in_offset: int = 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU path multiplies in: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def choose_a_first(m1: int, n1: int, m2: int, n2: int, identity_a: bool) -> bool:
    """Pick the cheaper association of ``A @ X @ B.T`` for one token.

    ``(X @ B.T)`` first costs ``n1*n2*m2 + m1*n1*m2`` multiply-adds, ``(A @ X)`` first costs
    ``m1*n1*n2 + m1*n2*m2``. For balanced factors they tie; for lopsided ones (``1 x n``
    factors) the wrong order is as expensive as the dense layer.
    """
    if identity_a:
        return False
    return m1 * n2 * (n1 + m2) < n1 * m2 * (n2 + m1)


class MokaBank:
    """Preallocated, in-place-updated factor buffers for ``num_slots`` adapters of one layer."""

    def __init__(
        self,
        num_slots: int,
        max_entries: int,
        max_a_numel: int,
        max_b_numel: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        slice_widths: Sequence[int] | None = None,
    ) -> None:
        if min(num_slots, max_entries, max_b_numel, in_features, out_features) < 1:
            raise ValueError("MokaBank sizes must be positive")
        widths = list(slice_widths) if slice_widths is not None else [out_features]
        if sum(widths) != out_features or min(widths) < 1:
            raise ValueError(f"slice widths {widths} do not add up to out_features {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.slice_widths = widths
        self.slice_offsets = [sum(widths[:i]) for i in range(len(widths))]
        self.a = torch.zeros(
            num_slots, max_entries, max(max_a_numel, 1), dtype=dtype, device=device
        )
        self.b = torch.zeros(num_slots, max_entries, max_b_numel, dtype=dtype, device=device)
        self.table = torch.zeros(
            num_slots, max_entries, NUM_FIELDS, dtype=torch.int32, device=device
        )
        self.entries: list[list[EntryShape]] = [[] for _ in range(num_slots)]
        # Slots holding at least one entry (host-side: a forward can skip the layer for free).
        self.occupied: set[int] = set()
        # Views of each slot's factors, built once at write time: the CPU path reads them on
        # every forward, and rebuilding views costs more than the tiny matmuls they feed.
        self.views: list[list[tuple[torch.Tensor | None, torch.Tensor, EntryShape]]] = [
            [] for _ in range(num_slots)
        ]
        # CPU only: the torch path's packed copy of the factors and its cached plans.
        self.cpu = CpuPack(num_slots, dtype, self.device) if self.device.type == "cpu" else None

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def max_entries(self) -> int:
        return self.a.shape[1]

    @property
    def num_slices(self) -> int:
        return len(self.slice_widths)

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def check_entries(self, entries: Sequence[KronEntry]) -> list[EntryShape]:
        """Validate entries against this bank's limits; return their table rows.

        Raises ``ValueError`` naming the entry and the limit, so a loader can reject an adapter
        before anything is written.
        """
        if len(entries) > self.max_entries:
            raise ValueError(
                f"{len(entries)} Kronecker terms exceed this layer's limit of {self.max_entries}"
            )
        shapes = []
        for i, e in enumerate(entries):
            if e.b.dim() != 2:
                raise ValueError(f"entry {i}: B must be 2-D, got shape {tuple(e.b.shape)}")
            m2, n2 = e.b.shape
            if e.a is None:
                if e.identity_size is None and self.in_features % n2:
                    raise ValueError(
                        f"entry {i}: n2={n2} does not divide in_features={self.in_features}"
                    )
                m1 = n1 = e.identity_size or self.in_features // n2
            else:
                if e.a.dim() != 2:
                    raise ValueError(f"entry {i}: A must be 2-D, got shape {tuple(e.a.shape)}")
                m1, n1 = e.a.shape
            if min(m1, n1, m2, n2) < 1:
                raise ValueError(f"entry {i}: empty factor ({m1}x{n1} (x) {m2}x{n2})")
            if e.in_offset < 0 or e.in_offset + n1 * n2 > self.in_features:
                raise ValueError(
                    f"entry {i}: input columns {e.in_offset}..{e.in_offset + n1 * n2} "
                    f"(n1*n2 = {n1}*{n2}) exceed in_features {self.in_features}"
                )
            if e.a is not None and m1 * n1 > self.a.shape[2]:
                raise ValueError(
                    f"entry {i}: A has {m1 * n1} elements, buffer holds {self.a.shape[2]}"
                )
            if m2 * n2 > self.b.shape[2]:
                raise ValueError(
                    f"entry {i}: B has {m2 * n2} elements, buffer holds {self.b.shape[2]}"
                )
            if not 0 <= e.slice < self.num_slices:
                raise ValueError(
                    f"entry {i}: slice {e.slice} does not exist ({self.num_slices} slices)"
                )
            width = self.slice_widths[e.slice]
            if e.out_offset < 0 or e.out_offset + m1 * m2 > width:
                raise ValueError(
                    f"entry {i}: rows {e.out_offset}..{e.out_offset + m1 * m2} "
                    f"(m1*m2 = {m1}*{m2}) exceed width {width} of output slice {e.slice}"
                )
            ident = e.a is None
            a_first = choose_a_first(m1, n1, m2, n2, ident)
            offset = self.slice_offsets[e.slice] + e.out_offset
            shapes.append(EntryShape(m1, n1, m2, n2, ident, a_first, offset, e.slice, e.in_offset))
        return shapes

    @torch.no_grad()
    def write_slot(self, slot: int, entries: Sequence[KronEntry]) -> None:
        """Write an adapter's folded factors into ``slot`` in place (nothing is reallocated)."""
        shapes = self.check_entries(entries)
        self.clear_slot(slot)
        rows = []
        for i, (e, s) in enumerate(zip(entries, shapes, strict=True)):
            if e.a is not None:
                self.a[slot, i, : s.m1 * s.n1].copy_(e.a.reshape(-1))
            self.b[slot, i, : s.m2 * s.n2].copy_(e.b.reshape(-1))
            rows.append(
                [
                    *(s.m1, s.n1, s.m2, s.n2, int(s.identity_a), int(s.a_first)),
                    *(s.out_offset, s.slice, s.in_offset),
                ]
            )
        if rows:
            self.table[slot, : len(rows)].copy_(torch.tensor(rows, dtype=torch.int32))
        self.entries[slot] = shapes
        if shapes:
            self.occupied.add(slot)
        self.views[slot] = [self._view(slot, i, s) for i, s in enumerate(shapes)]
        if self.cpu is not None:
            self.cpu.write(slot, entries, shapes, self.dtype)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.table[slot].zero_()
        self.entries[slot] = []
        self.occupied.discard(slot)
        self.views[slot] = []
        if self.cpu is not None:
            self.cpu.clear(slot)

    def _view(
        self, slot: int, index: int, s: EntryShape
    ) -> tuple[torch.Tensor | None, torch.Tensor, EntryShape]:
        a = None if s.identity_a else self.a[slot, index, : s.m1 * s.n1].view(s.m1, s.n1)
        return a, self.b[slot, index, : s.m2 * s.n2].view(s.m2, s.n2), s

    def factors(
        self, slot: int, index: int
    ) -> tuple[torch.Tensor | None, torch.Tensor, EntryShape]:
        """Views of entry ``index`` of ``slot``: ``(A or None, B, shape)``."""
        return self.views[slot][index]


class CpuPack:
    """What the CPU path keeps beside a bank: packed factors and per-shape plans.

    * ``packed``: each slot's used factors back to back (A0, B0, A1, B1, ...), so the CPU path
      gathers all of a token's factors with one copy of exactly the numbers used. Slots with the
      same ``shape_key`` have the same packing. Grown on demand: nothing on the CPU path is
      captured in a graph. Kept in float32 for half-precision banks: CPUs without native
      bf16/fp16 GEMMs run these tiny products about 7x slower in half precision (vLLM's CPU
      LoRA ops compute in float32 too).
    * ``shape_key``: slots with identical entry shapes get the same small int, so the CPU path
      can batch them without hashing the entry lists on every forward (-1: empty slot).
    * ``plans``: owned by ``torch_ops``: reusable buffers and views per (shape_key, tokens),
      which point into ``packed``'s layout; dropped whenever ``packed`` is reallocated.
    """

    def __init__(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.packed = torch.zeros(num_slots, 0, dtype=compute_dtype(dtype), device=device)
        self.packed_numel = [0] * num_slots
        self.shape_key: list[int] = [-1] * num_slots
        self._shape_ids: dict[tuple[EntryShape, ...], int] = {}
        self.plans: dict = {}

    def write(
        self,
        slot: int,
        entries: Sequence[KronEntry],
        shapes: Sequence[EntryShape],
        bank_dtype: torch.dtype,
    ) -> None:
        self.shape_key[slot] = self._shape_ids.setdefault(tuple(shapes), len(self._shape_ids))
        parts = []
        for e in entries:
            if e.a is not None:
                parts.append(e.a.reshape(-1))
            parts.append(e.b.reshape(-1))
        flat = torch.cat(parts).to(bank_dtype) if parts else self.packed.new_zeros(0)
        flat = flat.to(self.packed.dtype)  # rounded to the bank's dtype first, as the GPU sees it
        if flat.numel() > self.packed.shape[1]:
            grown = self.packed.new_zeros(self.packed.shape[0], flat.numel())
            grown[:, : self.packed.shape[1]] = self.packed
            self.packed = grown
            self.plans.clear()
        self.packed[slot, : flat.numel()] = flat
        self.packed_numel[slot] = flat.numel()

    def clear(self, slot: int) -> None:
        self.shape_key[slot] = -1
        self.packed_numel[slot] = 0


def check_apply_args(
    x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, bank: MokaBank
) -> None:
    """Argument checks shared by every implementation of ``moka_apply``."""
    if x.dim() != 2 or y.dim() != 2 or token_slots.dim() != 1:
        raise ValueError("expected x (T, in), y (T, out) and token_slots (T,)")
    if not (x.shape[0] == y.shape[0] == token_slots.shape[0]):
        raise ValueError(
            f"token counts differ: x {x.shape[0]}, y {y.shape[0]}, token_slots {token_slots.shape[0]}"
        )
    if x.shape[1] != bank.in_features or y.shape[1] != bank.out_features:
        raise ValueError(
            f"x/y widths ({x.shape[1]}, {y.shape[1]}) do not match the bank "
            f"({bank.in_features}, {bank.out_features})"
        )
