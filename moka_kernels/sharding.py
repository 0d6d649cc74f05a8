"""Exact tensor-parallel shards of Kronecker terms: what one rank applies of ``kron(A, B)``.

Under tensor parallelism a rank computes some output rows of a column-parallel layer (from the
whole input) or reads some input columns of a row-parallel one (its partial sums are added by
the all-reduce that follows the layer). Row-major kron: ``kron(A, B)[i1*m2 + i2, j1*n2 + j2] =
A[i1, j1] * B[i2, j2]``, so a contiguous range of rows is at most three Kronecker products of
row slices::

    rows [r0, r1)  =  kron(A[i:i+1], B[a:m2])   leading partial block (r0 not a multiple of m2)
                    + kron(A[i+1:j], B)          whole blocks
                    + kron(A[j:j+1], B[0:b])     trailing partial block (r1 not a multiple of m2)

and the same holds for columns (with ``n2``). A rank's part of a term is the product of its row
pieces and column pieces: ordinary Kronecker entries with an output and an input offset, which
every kernel applies as it applies an unsharded term. With an identity A (MoKAs) a piece of
``I_k`` is a shifted identity or nothing, never materialised. Nothing is approximated: the
ranks' entries add up to the unsharded term exactly (``tests/test_sharding.py``).

Each adapter is sharded once, when it is loaded; the kernels never see tensor parallelism.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .bank import KronEntry

# (start, length) of a run of rows or columns of the full (unsharded) layer.
Run = tuple[int, int]


def block_pieces(start: int, stop: int, block: int) -> list[tuple[int, int, int, int, int]]:
    """Cut indices ``[start, stop)`` of ``outer * block + inner`` into at most three runs.

    Returns ``(outer_start, outer_stop, inner_start, inner_stop, position)`` per run, where
    ``position`` is the run's first index relative to ``start``; each run covers
    ``outer in [outer_start, outer_stop)`` x ``inner in [inner_start, inner_stop)``.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"bad range [{start}, {stop})")
    pieces = []
    pos = start
    while pos < stop:
        outer, inner = divmod(pos, block)
        if inner or stop - pos < block:  # a partial block: one outer index
            end = min(stop, (outer + 1) * block)
            pieces.append((outer, outer + 1, inner, end - outer * block, pos - start))
        else:  # whole blocks
            end = (stop // block) * block
            pieces.append((outer, end // block, 0, block, pos - start))
        pos = end
    return pieces


@dataclass(frozen=True)
class LayerShard:
    """What one rank holds of a layer, in the full layer's coordinates.

    * ``in_features`` / ``slice_widths``: the full (unsharded) layer's input width and output
      slices, which adapters are written for.
    * ``rows[s]``: runs of slice ``s``'s full rows this rank computes, in the order they appear
      in its local output (vLLM's fused layers hold e.g. a q run, a k run and a v run).
    * ``cols``: the run of full input columns this rank reads (a row-parallel layer's shard).
    """

    in_features: int
    slice_widths: tuple[int, ...]
    rows: tuple[tuple[Run, ...], ...]
    cols: Run

    @classmethod
    def unsharded(cls, in_features: int, slice_widths: Sequence[int]) -> LayerShard:
        widths = tuple(int(w) for w in slice_widths)
        return cls(int(in_features), widths, tuple(((0, w),) for w in widths), (0, in_features))

    def __post_init__(self) -> None:
        # Adjacent runs are one run (a fused layer at TP=1 holds q, k and v back to back).
        merged = []
        for runs in self.rows:
            out: list[Run] = []
            for start, length in runs:
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((start, length))
            merged.append(tuple(out))
        object.__setattr__(self, "rows", tuple(merged))
        if len(self.rows) != len(self.slice_widths):
            raise ValueError("one tuple of row runs per output slice")
        for width, runs in zip(self.slice_widths, self.rows, strict=True):
            for start, length in runs:
                if start < 0 or length < 1 or start + length > width:
                    raise ValueError(f"row run ({start}, {length}) outside a slice of {width}")
        start, length = self.cols
        if start < 0 or length < 1 or start + length > self.in_features:
            raise ValueError(f"column run {self.cols} outside {self.in_features} inputs")

    @functools.cached_property
    def is_whole(self) -> bool:
        """Whether this rank holds the whole layer (TP=1): every term is then its own piece."""
        return self == LayerShard.unsharded(self.in_features, self.slice_widths)

    @property
    def local_slice_widths(self) -> list[int]:
        return [sum(length for _, length in runs) for runs in self.rows]

    @property
    def local_in_features(self) -> int:
        return self.cols[1]

    def max_pieces(self, slice: int) -> int:
        """Most entries one component of ``slice`` can become on this rank (bank sizing)."""
        rows = self.rows[slice]
        row_pieces = 1 if rows == ((0, self.slice_widths[slice]),) else 3 * len(rows)
        col_pieces = 1 if self.cols == (0, self.in_features) else 3
        return row_pieces * col_pieces

    def shard(self, entry: KronEntry) -> list[KronEntry]:
        """This rank's entries for one unsharded term of the full layer (often just one).

        ``entry`` must cover its whole slice and every input column, as a folded adapter
        component does. The results carry local offsets (``KronEntry.out_offset`` /
        ``in_offset``) and add up, over the ranks, to ``entry`` exactly.
        """
        if entry.out_offset or entry.in_offset:
            raise ValueError("only whole (unsharded) terms can be sharded")
        if self.is_whole:
            return [entry]
        if entry.rank > 1:
            return self._shard_low_rank(entry)
        m2, n2 = entry.b.shape
        if entry.a is None:
            m1 = n1 = entry.identity_size or self.in_features // n2
        else:
            m1, n1 = entry.a.shape
        width = self.slice_widths[entry.slice]
        if m1 * m2 != width or n1 * n2 != self.in_features:
            raise ValueError(
                f"term {m1}x{n1} (x) {m2}x{n2} does not cover the layer's "
                f"{width}x{self.in_features} slice"
            )
        col_start, col_len = self.cols
        col_pieces = block_pieces(col_start, col_start + col_len, n2)
        out: list[KronEntry] = []
        local_row = 0
        for row_start, row_len in self.rows[entry.slice]:
            for i1s, i1e, bs, be, rpos in block_pieces(row_start, row_start + row_len, m2):
                for j1s, j1e, cs, ce, cpos in col_pieces:
                    b = entry.b[bs:be, cs:ce].contiguous()
                    out_offset, in_offset = local_row + rpos, cpos
                    if entry.a is None:  # I_k[i1s:i1e, j1s:j1e]: a shifted identity or zero
                        d0, d1 = max(i1s, j1s), min(i1e, j1e)
                        if d0 >= d1:
                            continue
                        out_offset += (d0 - i1s) * (be - bs)
                        in_offset += (d0 - j1s) * (ce - cs)
                        piece = KronEntry(
                            b=b, slice=entry.slice, identity_size=d1 - d0,
                            out_offset=out_offset, in_offset=in_offset,
                        )  # fmt: skip
                    else:
                        a = entry.a[i1s:i1e, j1s:j1e].contiguous()
                        piece = KronEntry(
                            b=b, a=a, slice=entry.slice, out_offset=out_offset,
                            in_offset=in_offset,
                        )  # fmt: skip
                    out.append(piece)
            local_row += row_len
        return out

    def _shard_low_rank(self, entry: KronEntry) -> list[KronEntry]:
        """A low-rank entry ``U @ V``: one piece per run of rows, ``U``'s rows times ``V``'s
        columns (a LoRA's B and A shards)."""
        u, v = entry.a, entry.b
        width = self.slice_widths[entry.slice]
        if u is None or u.shape[0] != width or v.shape[1] != self.in_features:
            raise ValueError(
                f"low-rank term {None if u is None else tuple(u.shape)} x {tuple(v.shape)} does "
                f"not cover the layer's {width}x{self.in_features} slice"
            )
        col_start, col_len = self.cols
        v_piece = v[:, col_start : col_start + col_len].contiguous()
        out, local_row = [], 0
        for row_start, row_len in self.rows[entry.slice]:
            u_piece = u[row_start : row_start + row_len].contiguous()
            out.append(
                KronEntry(
                    b=v_piece, a=u_piece, slice=entry.slice, out_offset=local_row, rank=entry.rank
                )
            )
            local_row += row_len
        return out


def shard_delta(shard: LayerShard, delta: torch.Tensor) -> torch.Tensor:
    """The rank's block of a dense ``(out, in)`` update of the full layer (for references)."""
    offsets = [sum(shard.slice_widths[:i]) for i in range(len(shard.slice_widths))]
    rows = [
        torch.arange(off + start, off + start + length)
        for off, runs in zip(offsets, shard.rows, strict=True)
        for start, length in runs
    ]
    col_start, col_len = shard.cols
    return delta[torch.cat(rows)][:, col_start : col_start + col_len]
