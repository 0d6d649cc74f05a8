"""Factor storage for the adapter slots of one linear layer: the data every MoKA kernel reads.

A serving engine keeps a fixed number of adapter *slots* per layer (vLLM's ``max_loras``). Each
slot holds the folded Kronecker factors of one adapter for this layer: a list of *entries*, one
per (output slice, component). Storage is preallocated once and written in place, so that a
CUDA graph captured over the kernel stays valid when adapters are swapped.

Layout (S slots, E entries per slot at most):

* ``pool``: one flat buffer of ``pool_numel`` elements shared by all slots. A slot's factors
  sit back to back in one region of it (A0, B0, A1, B1, ...; an identity A takes no room), so a
  slot costs what its adapter weighs, not a worst case: small and large adapters share the pool.
  Regions are placed first-fit and compacted when free space is fragmented (data moves inside
  the pool; its address never changes).
* ``table``: int32 ``(S, E, NUM_FIELDS)``, one row per entry: the fields named below, including
  where the entry's A and B start in the pool. ``M1 == 0`` marks an unused entry.

On CPU the torch path reads its own packed copy (:class:`CpuPack`), so a CPU bank may be built
without a pool (``pooled=False``, what the plugin does): its memory then grows with the largest
adapter held, nothing is preallocated.

*Admission* keeps the pool from ever being full when a slot is written (inside an engine step,
where an error would kill the engine): a loader admits each adapter with its size before it can
be activated, and an adapter is admitted only if the ``S`` largest admitted adapters fit in the
pool together (any ``S`` of them can be in the slots at once).

The layer's output is split into *slices* (one slice for a plain linear layer; q, k and v of a
fused qkv projection), fixed when the bank is built. One entry adds ``kron(A, B) @ x[cols]`` (or
``kron(I_k, B) @ x[cols]`` when A is the identity) into ``m1*m2`` consecutive rows of its slice,
reading ``n1*n2`` consecutive input columns. An unsharded component covers its whole slice and
every input column; under tensor parallelism a component becomes a few entries that each cover
part of a rank's rows or columns (``moka_kernels.sharding``). The components of a mixture are
several entries on the same slice.

*Low-rank entries.* A rank-1 component ``kron(a, b)`` with ``a`` an ``(m, 1)`` column and ``b`` a
``(1, n)`` row is the outer product ``a @ b``; ``moka-train``'s default ``mixed`` family has one
balanced Kronecker component and several of these. :func:`group_rank_one` stacks all rank-1
components of a slice into one entry of rank ``r``: ``U = [a_1 .. a_r]`` ``(m, r)`` and
``V = [b_1; ..; b_r]`` ``(r, n)``, applied as ``U @ (V @ x)`` (a LoRA's shrink and expand), so
r components cost one pair of small GEMMs instead of r. Its table row reads ``m1 = m, n1 = 1,
m2 = 1, n2 = n`` (rows ``m1*m2``, columns ``n1*n2``, as for any entry) and ``RANK = r``; A and B
are stored ``(m, r)`` and ``(r, n)``, row-major. Every entry with ``n1 == m2 == 1`` and a stored
A is low-rank (rank 1 included) and the kernels apply it as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Column indices of ``MokaBank.table``.
M1, N1, M2, N2, IDENTITY_A, A_FIRST, OUT_OFFSET, SLICE, IN_OFFSET, A_START, B_START, RANK = range(
    12
)
NUM_FIELDS = 12


@dataclass(frozen=True)
class KronEntry:
    """One folded Kronecker term of one output slice.

    ``y[:, rows] += kron(A, B) @ x[:, cols]`` with ``rows`` the ``m1*m2`` rows of slice ``slice``
    from ``out_offset`` (relative to the slice's start) and ``cols`` the ``n1*n2`` input columns
    from ``in_offset``. ``a is None`` means A is the identity ``I_k`` (the MoKAs variant), never
    materialised; ``k`` is ``identity_size``, or ``in_features // b.shape[1]`` when None.

    ``rank > 1`` makes it a low-rank entry (module docstring): ``a`` is ``U`` ``(m, rank)``, ``b``
    is ``V`` ``(rank, n)`` and the term is ``U @ V`` (:func:`group_rank_one` builds them).
    """

    b: torch.Tensor
    a: torch.Tensor | None = None
    slice: int = 0
    out_offset: int = 0
    in_offset: int = 0
    identity_size: int | None = None
    rank: int = 1


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
    rank: int = 1

    @property
    def low_rank(self) -> bool:
        """Applied as ``U @ (V @ x)`` (module docstring): an ``(m, 1) (x) (1, n)`` term or a
        group of them."""
        return self.n1 == 1 and self.m2 == 1 and not self.identity_a

    @property
    def numel(self) -> int:
        """Factor elements the entry stores (an identity A stores none)."""
        return self.rank * ((0 if self.identity_a else self.m1 * self.n1) + self.m2 * self.n2)

    @property
    def a_shape(self) -> tuple[int, int]:
        """How A is stored: ``(m1, n1)``, or ``U``'s ``(m, rank)`` for a low-rank entry."""
        return (self.m1, self.n1 * self.rank)

    @property
    def b_shape(self) -> tuple[int, int]:
        """How B is stored: ``(m2, n2)``, or ``V``'s ``(rank, n)`` for a low-rank entry."""
        return (self.m2 * self.rank, self.n2)


def rank_one_shape(m1: int, n1: int, m2: int, n2: int) -> bool:
    """Whether ``kron(A, B)`` with A ``(m1, n1)`` and B ``(m2, n2)`` is an outer product:
    ``(m, 1) (x) (1, n)`` or ``(1, n) (x) (m, 1)`` (never with an identity A)."""
    return (n1 == 1 and m2 == 1) or (m1 == 1 and n2 == 1)


def is_rank_one(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """:func:`rank_one_shape` of a stored pair (an identity A, ``None``, is not rank 1)."""
    return a is not None and rank_one_shape(*a.shape, *b.shape)


def group_rank_one(entries: Sequence[KronEntry]) -> list[KronEntry]:
    """The same update with every slice's rank-1 terms stacked into one low-rank entry.

    Only whole, unsharded terms (offsets 0) are grouped; the others are kept as they are, in
    their order, and the group of a slice takes the place of its first rank-1 term. A term
    ``(1, n) (x) (m, 1)`` is the outer product ``b @ a`` and joins as ``(b, a)``.
    """
    out: list[KronEntry | list[KronEntry]] = []
    groups: dict[int, list[KronEntry]] = {}
    for e in entries:
        if e.rank != 1 or e.out_offset or e.in_offset or not is_rank_one(e.a, e.b):
            out.append(e)
            continue
        u, v = (e.a, e.b) if e.a.shape[1] == 1 else (e.b, e.a)
        term = KronEntry(b=v, a=u, slice=e.slice)
        if e.slice not in groups:
            groups[e.slice] = []
            out.append(groups[e.slice])
        groups[e.slice].append(term)
    result = []
    for item in out:
        if isinstance(item, KronEntry):
            result.append(item)
        else:
            u = torch.cat([t.a for t in item], dim=1)
            v = torch.cat([t.b for t in item], dim=0)
            result.append(KronEntry(b=v, a=u, slice=item[0].slice, rank=len(item)))
    return result


def entries_numel(shapes: Sequence[EntryShape]) -> int:
    """Pool elements one adapter's entries take in a layer."""
    return sum(s.numel for s in shapes)


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
    """Preallocated, in-place-updated factor storage for ``num_slots`` adapters of one layer.

    ``pool_numel`` is the capacity: factor elements of all slots together. ``max_a_numel`` /
    ``max_b_numel`` cap one factor (the bank limits users see); ``pooled`` is False for a
    CPU-only bank whose factors live in the torch path's :class:`CpuPack` (default: pooled
    everywhere but on CPU).
    """

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
        pool_numel: int | None = None,
        pooled: bool | None = None,
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
        self.max_a_numel = max(max_a_numel, 1)
        self.max_b_numel = max_b_numel
        if pool_numel is None:  # room for every slot full at the factor caps
            pool_numel = num_slots * max_entries * (self.max_a_numel + max_b_numel)
        if pool_numel < 0:
            raise ValueError("pool_numel must not be negative")
        self.pool_numel = pool_numel
        device = torch.device(device)
        if pooled is None:
            pooled = device.type != "cpu"
        self.pool = torch.zeros(pool_numel, dtype=dtype, device=device) if pooled else None
        self.table = torch.zeros(
            num_slots, max_entries, NUM_FIELDS, dtype=torch.int32, device=device
        )
        self._dtype = dtype
        self._device = device
        self.entries: list[list[EntryShape]] = [[] for _ in range(num_slots)]
        # Slots holding at least one entry (host-side: a forward can skip the layer for free).
        self.occupied: set[int] = set()
        # slot -> (start, numel) of its region of the pool; host-side table rows per slot.
        self.regions: dict[int, tuple[int, int]] = {}
        self._rows: list[list[list[int]]] = [[] for _ in range(num_slots)]
        # Admitted adapters: key -> pool elements (see the module docstring).
        self.admitted: dict[object, int] = {}
        # Views of each slot's factors (``slot_views``), built on first use after a write: the
        # torch path reads them on every forward, and rebuilding views costs more than the tiny
        # matmuls they feed; the C++ kernel reads ``table`` and the packed copy, not these.
        self._views: list[list[FactorViews] | None] = [None] * num_slots
        # CPU only: the torch path's packed copy of the factors and its cached plans.
        self.cpu = CpuPack(num_slots, dtype, device) if device.type == "cpu" else None
        if self.pool is None and self.cpu is None:
            raise ValueError("a bank off the CPU needs its pool (pooled=True)")

    @property
    def num_slots(self) -> int:
        return self.table.shape[0]

    @property
    def max_entries(self) -> int:
        return self.table.shape[1]

    @property
    def num_slices(self) -> int:
        return len(self.slice_widths)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def held_numel(self) -> int:
        """Factor elements the slots hold now (their pool regions, when pooled)."""
        return sum(entries_numel(e) for e in self.entries)

    def nbytes(self) -> int:
        """Bytes this bank keeps (pool, table and the CPU path's packed copy)."""
        total = self.table.numel() * self.table.element_size()
        if self.pool is not None:
            total += self.pool.numel() * self.pool.element_size()
        if self.cpu is not None:
            total += self.cpu.packed.numel() * self.cpu.packed.element_size()
        return total

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
            rank = e.rank
            if rank > 1:  # a low-rank entry: U (m, rank), V (rank, n)
                if e.a is None or e.a.dim() != 2 or e.a.shape[1] != rank or m2 != rank:
                    raise ValueError(
                        f"entry {i}: a rank-{rank} entry needs A (m, {rank}) and B ({rank}, n), "
                        f"got {None if e.a is None else tuple(e.a.shape)} and {tuple(e.b.shape)}"
                    )
                m2 = 1
            elif rank < 1:
                raise ValueError(f"entry {i}: rank must be at least 1, got {rank}")
            if e.a is None:
                if e.identity_size is None and self.in_features % n2:
                    raise ValueError(
                        f"entry {i}: n2={n2} does not divide in_features={self.in_features}"
                    )
                m1 = n1 = e.identity_size or self.in_features // n2
            else:
                if e.a.dim() != 2:
                    raise ValueError(f"entry {i}: A must be 2-D, got shape {tuple(e.a.shape)}")
                m1, n1 = e.a.shape[0], e.a.shape[1] // rank
            if min(m1, n1, m2, n2) < 1:
                raise ValueError(f"entry {i}: empty factor ({m1}x{n1} (x) {m2}x{n2})")
            if e.in_offset < 0 or e.in_offset + n1 * n2 > self.in_features:
                raise ValueError(
                    f"entry {i}: input columns {e.in_offset}..{e.in_offset + n1 * n2} "
                    f"(n1*n2 = {n1}*{n2}) exceed in_features {self.in_features}"
                )
            if e.a is not None and m1 * n1 > self.max_a_numel:
                raise ValueError(
                    f"entry {i}: A has {m1 * n1} elements, buffer holds {self.max_a_numel}"
                )
            if m2 * n2 > self.max_b_numel:
                raise ValueError(
                    f"entry {i}: B has {m2 * n2} elements, buffer holds {self.max_b_numel}"
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
            shapes.append(
                EntryShape(m1, n1, m2, n2, ident, a_first, offset, e.slice, e.in_offset, rank)
            )
        numel = entries_numel(shapes)
        if numel > self.pool_numel:
            raise ValueError(
                f"the adapter's factors take {numel} elements in this layer, its pool holds "
                f"{self.pool_numel}"
            )
        return shapes

    # -- admission -------------------------------------------------------------------------

    def admission_problem(self, key: object, numel: int) -> str | None:
        """Why admitting ``key`` with ``numel`` pool elements could overfill the pool, or None.

        Admitting a key again with its own size never fails (a reload after eviction)."""
        sizes = dict(self.admitted)
        sizes[key] = numel
        largest = sorted(sizes.values(), reverse=True)[: self.num_slots]
        if sum(largest) <= self.pool_numel:
            return None
        return (
            f"the adapter needs {numel} pool elements in this layer; with the adapters already "
            f"loaded, {self.num_slots} slots could need {sum(largest)} of the pool's "
            f"{self.pool_numel} (unload adapters, or give the pool more room)"
        )

    def admit(self, key: object, numel: int) -> None:
        if problem := self.admission_problem(key, numel):
            raise ValueError(problem)
        self.admitted[key] = numel

    def release(self, key: object) -> None:
        """Forget an admitted adapter (it was unloaded; a slot holding it stays valid)."""
        self.admitted.pop(key, None)

    # -- slots -----------------------------------------------------------------------------

    @torch.no_grad()
    def write_slot(
        self,
        slot: int,
        entries: Sequence[KronEntry],
        shapes: Sequence[EntryShape] | None = None,
    ) -> None:
        """Write an adapter's folded factors into ``slot`` in place (nothing is reallocated).

        ``shapes`` is ``check_entries(entries)`` when the caller already ran it. A loader does
        more ahead: it builds the :class:`SlotImage` of every layer at load time
        (:func:`slot_images`) and activation calls :meth:`write_image`, which only copies.
        Raises ``ValueError`` only if the pool cannot hold the slot, which admission rules out."""
        shapes = self.check_entries(entries) if shapes is None else shapes
        self.write_image(slot, slot_images([(self, entries, shapes)])[0])

    @torch.no_grad()
    def write_image(self, slot: int, image: SlotImage) -> None:
        """Copy ``image`` (:func:`slot_images`, built for this bank) into ``slot`` in place."""
        self.clear_slot(slot)
        numel = image.numel
        start = self._place(numel) if self.pool is not None and numel else 0
        rows = [list(r) for r in image.rows]
        if start:
            for r in rows:
                r[A_START] += start
                r[B_START] += start
        if self.pool is not None and numel:
            self.pool[start : start + numel].copy_(image.pool_data)
            self.regions[slot] = (start, numel)
        self._rows[slot] = rows
        if rows:
            table = image.table_rows if not start else torch.tensor(rows, dtype=torch.int32)
            self.table[slot, : len(rows)].copy_(table)
        self.entries[slot] = list(image.shapes)
        if image.shapes:
            self.occupied.add(slot)
        grown = self.cpu is not None and self.cpu.write(slot, image.packed_data, image.shapes)
        if grown and self.pool is None:  # views of every slot pointed into the old copy
            self._views = [None] * self.num_slots
        self._views[slot] = None

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Mark every entry of ``slot`` unused (``M1 == 0``) and free its region; no kernel
        reads its factors then, so they are left as they are."""
        self.table[slot].zero_()
        self.regions.pop(slot, None)
        self._rows[slot] = []
        self.entries[slot] = []
        self.occupied.discard(slot)
        self._views[slot] = None
        if self.cpu is not None:
            self.cpu.clear(slot)

    def _place(self, numel: int) -> int:
        """Start of a free run of ``numel`` pool elements: first fit, compacting if needed."""
        start = self._first_fit(numel)
        if start is None and self.pool_numel - self.held_numel >= numel:
            self._compact()
            start = self._first_fit(numel)
        if start is None:
            raise ValueError(
                f"the pool is full: {numel} elements needed, {self.pool_numel - self.held_numel} "
                f"of {self.pool_numel} free"
            )
        return start

    def _first_fit(self, numel: int) -> int | None:
        cursor = 0
        for start, n in sorted(self.regions.values()):
            if start - cursor >= numel:
                return cursor
            cursor = start + n
        return cursor if self.pool_numel - cursor >= numel else None

    @torch.no_grad()
    def _compact(self) -> None:
        """Move every region down to close the gaps (front to back, so no region is
        overwritten before it moved); the table and views follow."""
        assert self.pool is not None
        cursor = 0
        for slot, (start, n) in sorted(self.regions.items(), key=lambda kv: kv[1][0]):
            if start != cursor:
                self.pool[cursor : cursor + n] = self.pool[start : start + n].clone()
                shift = cursor - start
                for row in self._rows[slot]:
                    row[A_START] += shift
                    row[B_START] += shift
                rows = self._rows[slot]
                self.table[slot, : len(rows)].copy_(torch.tensor(rows, dtype=torch.int32))
                self.regions[slot] = (cursor, n)
                self._views[slot] = None
            cursor += n

    def slot_views(self, slot: int) -> list[FactorViews]:
        """``(A or None, B, shape)`` views of each entry of ``slot`` (``U``, ``V`` for a
        low-rank entry), in the layout the kernels read; built once per write."""
        views = self._views[slot]
        if views is None:
            views = self._views[slot] = self._build_views(slot)
        return views

    def _build_views(self, slot: int) -> list[FactorViews]:
        if self.pool is not None:
            store, rows = self.pool, self._rows[slot]
            starts = [(r[A_START], r[B_START]) for r in rows]
        else:  # the CPU path's packed row: the same offsets from 0, some factors transposed
            assert self.cpu is not None
            store, starts, pos = self.cpu.packed[slot], [], 0
            for s in self.entries[slot]:
                a_start = pos
                pos += 0 if s.identity_a else s.m1 * s.n1 * s.rank
                starts.append((a_start, pos))
                pos += s.m2 * s.n2 * s.rank
        packed = self.pool is None  # CpuPack: U or B stored transposed (pack_factors)
        views = []
        for s, (a0, b0) in zip(self.entries[slot], starts, strict=True):
            (am, an), (bm, bn) = s.a_shape, s.b_shape
            a_t, b_t = packed and s.low_rank, packed and not s.low_rank
            a = None
            if not s.identity_a:
                a = store[a0 : a0 + am * an].view(*((an, am) if a_t else (am, an)))
                a = a.mT if a_t else a
            b = store[b0 : b0 + bm * bn].view(*((bn, bm) if b_t else (bm, bn)))
            views.append((a, b.mT if b_t else b, s))
        return views

    def factors(self, slot: int, index: int) -> FactorViews:
        """Views of entry ``index`` of ``slot`` (:meth:`slot_views`)."""
        return self.slot_views(slot)[index]


def pack_factors(entry: KronEntry, shape: EntryShape) -> list[torch.Tensor]:
    """An entry's factors as :class:`CpuPack` stores them, in order (see there)."""
    if shape.low_rank:
        return [entry.a.t(), entry.b]
    return ([] if entry.a is None else [entry.a]) + [entry.b.t()]


FactorViews = tuple[torch.Tensor | None, torch.Tensor, EntryShape]


@dataclass(frozen=True)
class SlotImage:
    """One adapter's entries for one layer, in the form :meth:`MokaBank.write_image` copies:
    the table rows (``A_START``/``B_START`` counted from the region's start), the factors back
    to back in the pool's order and dtype (pooled banks) and in :class:`CpuPack`'s (CPU banks).

    Built by :func:`slot_images` when an adapter is loaded, so activating it (inside an engine
    step) is a few copies per layer instead of a cast, a pack and a table build."""

    shapes: tuple[EntryShape, ...]
    rows: tuple[tuple[int, ...], ...]
    table_rows: torch.Tensor  # rows as int32, on the bank's device
    pool_data: torch.Tensor | None
    packed_data: torch.Tensor | None

    @property
    def numel(self) -> int:
        return entries_numel(self.shapes)


def slot_images(
    layers: Sequence[tuple[MokaBank, Sequence[KronEntry], Sequence[EntryShape]]],
) -> list[SlotImage]:
    """The :class:`SlotImage` of each ``(bank, entries, shapes)`` (``shapes`` from the bank's
    ``check_entries``), every layer's factors cast and packed together: one concatenation per
    form and dtype for a whole adapter rather than several small ops per layer."""
    rows_of, pool_parts, packed_parts = [], {}, {}
    for i, (bank, entries, shapes) in enumerate(layers):
        rows, pos, pool, packed = [], 0, [], []
        for e, s in zip(entries, shapes, strict=True):
            a_start = pos
            pos += 0 if e.a is None else e.a.numel()
            rows.append((s.m1, s.n1, s.m2, s.n2, int(s.identity_a), int(s.a_first),
                         s.out_offset, s.slice, s.in_offset, a_start, pos, s.rank))  # fmt: skip
            pos += e.b.numel()
            if bank.pool is not None:
                pool += [t.reshape(-1) for t in (e.a, e.b) if t is not None]
            if bank.cpu is not None:
                packed += [t.reshape(-1) for t in pack_factors(e, s)]
        rows_of.append(tuple(rows))
        if bank.pool is not None:
            pool_parts.setdefault(bank.pool.dtype, []).append((i, pool))
        if bank.cpu is not None:  # rounded to the bank's dtype first, as a GPU bank holds it
            packed_parts.setdefault((bank.dtype, bank.cpu.packed.dtype), []).append((i, packed))
    pool_data = _concat_by_layer(pool_parts, lambda key, flat: flat.to(key))
    packed_data = _concat_by_layer(packed_parts, lambda key, flat: flat.to(key[0]).to(key[1]))
    # Every layer's table rows in one tensor, split into views (moved once per device).
    counts = [len(rows) for rows in rows_of]
    table = torch.tensor([row for rows in rows_of for row in rows], dtype=torch.int32)
    table = table.reshape(-1, NUM_FIELDS)
    tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}
    images = []
    for i, (bank, _, shapes) in enumerate(layers):
        if bank.device not in tables:
            tables[bank.device] = table.to(bank.device).split(counts)
        data = (pool_data.get(i), packed_data.get(i))
        images.append(SlotImage(tuple(shapes), rows_of[i], tables[bank.device][i], *data))
    return images


def _concat_by_layer(parts_by_key: dict, cast) -> dict[int, torch.Tensor]:
    """Layer index -> its parts concatenated and cast (``cast(key, flat)``), one ``cat`` and
    one cast per key for all layers, split back into views."""
    out: dict[int, torch.Tensor] = {}
    for key, layers in parts_by_key.items():
        flat = [t for _, parts in layers for t in parts]
        whole = cast(key, torch.cat(flat)) if flat else None
        sizes = [sum(t.numel() for t in parts) for _, parts in layers]
        pieces = whole.split(sizes) if whole is not None else [None] * len(layers)
        for (i, _), size, piece in zip(layers, sizes, pieces, strict=True):
            out[i] = piece if size else cast(key, torch.zeros(0))
    return out


class CpuPack:
    """What the CPU path keeps beside a bank: packed factors and per-shape plans.

    * ``packed``: each slot's used factors back to back (A0, B0, A1, B1, ...), so the CPU path
      gathers all of a token's factors with one copy of exactly the numbers used. Slots with the
      same ``shape_key`` have the same packing. Each factor sits the way the CPU products read
      it along rows: a Kronecker entry's A as ``(m1, n1)`` and B transposed, ``(n2, m2)``; a
      low-rank entry's U transposed, ``(r, m)``, and V as ``(r, n)`` (:func:`pack_factors`;
      the table's offsets hold, the sizes being the same). Grown on demand: nothing on the CPU
      path is captured in a graph. Kept in float32 for half-precision banks: CPUs without native
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

    def write(self, slot: int, data: torch.Tensor, shapes: Sequence[EntryShape]) -> bool:
        """Copy ``slot``'s packed factors (a :class:`SlotImage`'s ``packed_data``); True if
        ``packed`` was reallocated (views into it moved)."""
        self.shape_key[slot] = self._shape_ids.setdefault(tuple(shapes), len(self._shape_ids))
        n = data.numel()
        if n > self.packed.shape[1]:
            # A normal tensor even when a slot is written inside an engine step (inference
            # mode): an inference tensor could not be written by a later load outside it.
            with torch.inference_mode(False):
                grown = self.packed.new_zeros(self.packed.shape[0], n)
                grown[:, : self.packed.shape[1]] = self.packed
            self.packed = grown
            self.plans.clear()
        else:
            grown = None
        self.packed[slot, :n] = data
        self.packed_numel[slot] = n
        return grown is not None

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
