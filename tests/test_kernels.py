"""Every MoKA kernel against the float64 ``torch.kron`` reference, on fresh random inputs.

Shapes include SmolLM2's odd widths (576 = 24x24, 192 = 12x16), ``1 x n`` factors, identity
(MoKAs) factors and fused multi-slice outputs; mappings mix adapters with -1 (no adapter) tokens.
Outputs start poisoned: rows of -1 tokens and slices no adapter touches must come back
bit-identical (NaN included), and adapted rows must equal ``y0 + delta`` (added exactly once).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from moka_kernels import KronEntry, MokaBank, delta_weight, moka_apply_naive, moka_apply_torch
from moka_kernels.bank import slot_images
from moka_kernels.torch_ops import PLAN_MAX_TOKENS

triton_ops = pytest.importorskip("moka_kernels.triton_ops")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (in_features, slice widths, {slice: [(m1, n1, m2, n2, identity_a[, rank]), ...]}); a rank
# > 1 is a low-rank entry (U (m1, rank), V (rank, n2), n1 = m2 = 1): grouped rank-1 components.
LAYERS = {
    "mixed-48x40": (
        48,
        [40],
        {
            0: [
                (5, 6, 8, 8, False),
                (1, 48, 40, 1, False),
                (40, 1, 1, 48, False),
                (4, 4, 10, 12, True),
            ]
        },
    ),
    "qkv-slices": (
        48,
        [24, 8, 8],
        {0: [(4, 6, 6, 8, False), (2, 2, 12, 24, True)], 2: [(2, 4, 4, 12, False)]},
    ),
    "smollm-v_proj": (576, [192], {0: [(12, 24, 16, 24, False), (16, 36, 12, 16, False)]}),
    "smollm-q_proj": (576, [576], {0: [(24, 24, 24, 24, False), (24, 24, 24, 24, True)]}),
    # moka-train's mixed family: a balanced term and the rank-1 ones grouped (rank 7, 3, 1),
    # and a rank over the Triton path's rank tile (17 > LOW_RANK_BLOCK_R)
    "mixed-family-qkv": (
        48,
        [24, 8, 8],
        {
            0: [(4, 6, 6, 8, False), (24, 1, 1, 48, False, 7)],
            1: [(8, 1, 1, 48, False, 3), (2, 4, 4, 12, False)],
            2: [(8, 1, 1, 48, False, 17)],
        },
    ),
    "smollm-v_proj-mixed-8": (
        576,
        [192],
        {0: [(12, 24, 16, 24, False), (192, 1, 1, 576, False, 7)]},
    ),  # fmt: skip
}


def random_entries(
    spec: dict, gen: torch.Generator, dtype: torch.dtype, variant: int
) -> list[KronEntry]:
    """Random factors; `variant` drops or reorders components so slots differ in shape."""
    entries = []
    for slice_id, comps in spec.items():
        comps = comps[variant % len(comps) :] + comps[: variant % len(comps)]
        comps = comps[: max(1, len(comps) - variant % 2)]
        for m1, n1, m2, n2, ident, *rank in comps:
            r = rank[0] if rank else 1
            b = torch.randn(m2 * r, n2, generator=gen, dtype=torch.float64) / n2**0.5
            a = (
                None
                if ident
                else torch.randn(m1, n1 * r, generator=gen, dtype=torch.float64) / n1**0.5
            )
            a = None if a is None else a.to(dtype)
            entries.append(KronEntry(b=b.to(dtype), a=a, slice=slice_id, rank=r))
    return entries


def poison_unused(bank: MokaBank) -> None:
    """NaN wherever a kernel must never read: the pool outside the slots' regions, unused
    table entries' storage, and the CPU path's packed rows past each slot's own factors."""
    if bank.pool is not None:
        used = torch.zeros(bank.pool_numel, dtype=torch.bool)
        for start, n in bank.regions.values():
            used[start : start + n] = True
        bank.pool[~used.to(bank.pool.device)] = float("nan")
    if bank.cpu is not None:
        for slot in range(bank.num_slots):
            bank.cpu.packed[slot, bank.cpu.packed_numel[slot] :] = float("nan")


def make_bank(
    layer: str,
    num_slots: int,
    dtype: torch.dtype,
    seed: int,
    same_shapes: bool = False,
    pooled: bool = True,
    write: bool = True,
) -> MokaBank:
    """``pooled``: the Triton kernel reads the pool (in the interpreter on CPU too); the plugin
    builds CPU banks without one, the C++ kernel's case. ``write=False``: every slot empty."""
    in_features, widths, spec = LAYERS[layer]
    max_entries = sum(len(c) for c in spec.values())
    max_a = max(m1 * n1 for comps in spec.values() for m1, n1, *_ in comps)
    max_b = max(m2 * n2 for comps in spec.values() for _, _, m2, n2, *_ in comps)
    max_rank = max(c[5] if len(c) > 5 else 1 for comps in spec.values() for c in comps)
    bank = MokaBank(
        num_slots, max_entries, max_a, max_b, in_features, sum(widths), dtype,
        DEVICE if pooled else "cpu", widths, pooled=pooled,
        pool_numel=num_slots * max_entries * max_rank * (max_a + max_b),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    for slot in range(num_slots - 1 if write else 0):  # the last slot stays empty
        variant = 0 if same_shapes else slot
        bank.write_slot(slot, random_entries(spec, gen, dtype, variant=variant))
    poison_unused(bank)
    return bank


MAPPINGS = {
    "distinct": lambda n, s: torch.arange(n) % s,
    "mixed-with-none": lambda n, s: torch.tensor([(i * 7) % (s + 1) - 1 for i in range(n)]),
    "identical": lambda n, s: torch.zeros(n, dtype=torch.long),
    # every token adapted (the last slot is left empty by make_bank)
    "all-adapted": lambda n, s: torch.arange(n) % max(s - 1, 1),
    "all-none": lambda n, s: torch.full((n,), -1),
    "runs": lambda n, s: torch.arange(n) * s // max(n, 1) - (torch.arange(n) < n // 5).long(),
}

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def reference(x, y0, slots, bank):
    """Naive result in float64: y0 + delta for adapted tokens."""
    y = y0.to(torch.float64).clone()
    moka_apply_naive(x.to(torch.float64), y, slots, bank)
    return y


def check(y, y0, ref, slots, bank, dtype):
    untouched = slots < 0
    # rows without an adapter and the empty slot's rows come back bit for bit, poison included
    untouched |= slots == bank.num_slots - 1
    assert torch.equal(y[untouched].isnan(), y0[untouched].isnan())
    assert torch.equal(y[untouched].nan_to_num(), y0[untouched].nan_to_num())
    # slices that no entry of the token's slot touches are untouched too
    for slot in slots.unique().tolist():
        if slot < 0:
            continue
        covered = torch.zeros(bank.out_features, dtype=torch.bool)
        for s in bank.entries[slot]:
            covered[s.out_offset : s.out_offset + s.m1 * s.m2] = True
        rows = slots == slot
        assert torch.equal(
            y[rows][:, ~covered].nan_to_num(nan=7.0), y0[rows][:, ~covered].nan_to_num(nan=7.0)
        )
    adapted = ~untouched
    if adapted.any():
        got = y[adapted].to(torch.float64)
        want = ref[adapted]
        scale = want.abs().max().clamp_min(1.0)
        err = (got - want).abs().max() / scale
        assert err <= TOL[dtype], f"max relative error {err:.3g} > {TOL[dtype]}"


def run_case(
    impl, layer, mapping, num_tokens, dtype, seed, num_slots=4, same_shapes=False, pooled=True
):
    bank = make_bank(layer, num_slots, dtype, seed, same_shapes, pooled)
    gen = torch.Generator().manual_seed(seed + 1)
    slots = MAPPINGS[mapping](num_tokens, num_slots).long()
    x = torch.randn(num_tokens, bank.in_features, generator=gen).to(dtype)
    y0 = torch.randn(num_tokens, bank.out_features, generator=gen).to(dtype)
    # poison: inputs of tokens without adapter, and outputs of untouched rows
    x[slots < 0] = float("nan")
    y0[slots < 0] = float("nan")
    ref = reference(x.nan_to_num(), y0, slots, bank)
    y = y0.clone().to(DEVICE)
    impl(x.to(DEVICE), y, slots.to(DEVICE), bank)
    check(y.cpu(), y0, ref, slots, bank, dtype)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("mapping", list(MAPPINGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [13, PLAN_MAX_TOKENS + 7])  # cached plans / one-off
def test_torch_path_matches_kron_reference(layer, mapping, dtype, num_tokens):
    run_case(
        moka_apply_torch,
        layer,
        mapping,
        num_tokens=num_tokens,
        dtype=dtype,
        seed=zlib.crc32(f"{layer}/{mapping}".encode()) % 1000,
    )


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("mapping", ["distinct", "mixed-with-none", "runs", "all-adapted"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [13, PLAN_MAX_TOKENS + 7])
def test_torch_path_slots_with_same_shapes_gathered(layer, mapping, dtype, num_tokens):
    """Adapters with identical component shapes take the gathered (BGMV-like) branch: in place
    when every token is adapted, through index_select / index_add when some are not; cached
    plans for small batches, one-off ones for large."""
    run_case(moka_apply_torch, layer, mapping, num_tokens, dtype, seed=5, same_shapes=True)


@pytest.fixture
def torch_threads():
    """Set torch's thread count inside a test (``torch_threads(n)``); restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    """The C++ CPU kernel, built from the project's source into a fresh folder: a machine
    where it cannot build fails here (the plugin would fall back to the torch path)."""
    from moka_kernels import cpu_kernel

    assert cpu_kernel.load(tmp_path_factory.mktemp("kernels")) is None
    return cpu_kernel


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("mapping", list(MAPPINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 13, 64])
def test_cpp_kernel_matches_kron_reference(cpp, layer, mapping, dtype, num_tokens):
    seed = zlib.crc32(f"cpp/{layer}/{mapping}/{num_tokens}".encode()) % 1000
    run_case(cpp.moka_apply_cpp, layer, mapping, num_tokens, dtype, seed, pooled=False)


@pytest.mark.parametrize("layer", ["mixed-family-qkv", "smollm-q_proj", "smollm-v_proj-mixed-8"])
@pytest.mark.parametrize("mapping", ["runs", "identical", "mixed-with-none"])
def test_cpp_kernel_matches_kron_reference_on_prefill_sized_batches(
    cpp, torch_threads, layer, mapping
):
    """Batches past MAX_TOKENS (a prefill chunk beside other requests' decode tokens), which
    the kernel takes where torch runs on one thread."""
    torch_threads(1)
    seed = zlib.crc32(f"cpp-prefill/{layer}/{mapping}".encode()) % 1000
    run_case(cpp.moka_apply_cpp, layer, mapping, 3 * cpp.MAX_TOKENS + 5, torch.float32, seed,
             pooled=False)  # fmt: skip


@pytest.mark.parametrize("mapping", ["mixed-with-none", "all-adapted"])
def test_cpp_kernel_same_shapes_and_strided_rows(cpp, mapping):
    """Slots with identical shapes, and x/y given as column slices of wider tensors (rows
    with a stride, as a layer's views may be)."""
    run_case(cpp.moka_apply_cpp, "mixed-family-qkv", mapping, 9, torch.float32, seed=11,
             same_shapes=True, pooled=False)  # fmt: skip
    bank = make_bank("qkv-slices", 4, torch.float32, seed=12, pooled=False)
    gen = torch.Generator().manual_seed(13)
    slots = MAPPINGS[mapping](6, 4).long()
    wide_x = torch.randn(6, bank.in_features + 5, generator=gen)
    wide_y = torch.randn(6, bank.out_features + 3, generator=gen)
    x, y = wide_x[:, 2 : 2 + bank.in_features], wide_y[:, 1 : 1 + bank.out_features]
    y0, wide_y0 = y.clone(), wide_y.clone()
    cpp.moka_apply_cpp(x, y, slots, bank)
    check(y, y0, reference(x, y0, slots, bank), slots, bank, torch.float32)
    assert torch.equal(wide_y[:, :1], wide_y0[:, :1]) and torch.equal(
        wide_y[:, -2:], wide_y0[:, -2:]
    )


def test_cpp_kernel_refuses_what_it_cannot_take(cpp, torch_threads, monkeypatch, tmp_path):
    pooled = make_bank("qkv-slices", 2, torch.float32, seed=1)  # reads the pool: torch path
    unpooled = make_bank("qkv-slices", 2, torch.float32, seed=1, pooled=False)
    x = torch.zeros(cpp.MAX_TOKENS + 1, 48)
    assert not cpp.supports(x[:4], pooled) and cpp.supports(x[:4], unpooled)
    # a prefill chunk: the torch path's multi-threaded GEMMs when torch has threads ...
    torch_threads(2)
    assert cpp.supports(x[:-1], unpooled) and not cpp.supports(x, unpooled)
    with pytest.raises(RuntimeError, match="cannot take this call"):
        cpp.moka_apply_cpp(x, torch.zeros(len(x), 40), torch.zeros(len(x), dtype=torch.long),
                           unpooled)  # fmt: skip
    # ... and the kernel's, faster, when torch runs on one thread
    torch_threads(1)
    assert cpp.takes(100_000) and cpp.supports(x, unpooled)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails: a reason, not an exception
    with pytest.raises(RuntimeError, match="false failed"):
        cpp.build(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
    monkeypatch.delenv("CXX")
    broken = cpp.library_path(tmp_path, cpp.find_compiler())
    broken.write_bytes(b"not a shared library")  # a cached build cut short
    assert cpp.open_library(tmp_path).moka_cpu_kernel_version() == cpp.VERSION


def _layer_call(cpp, max_tokens: int):
    """``impl(x, y, slots, bank)`` through a :class:`LayerCall` over a step's slot buffer of
    ``max_tokens`` rows (-1 past the batch's tokens), as the plugin's layers call it."""

    def impl(x, y, slots, bank):
        buf = torch.full((max_tokens,), -1, dtype=torch.long)
        buf[: len(slots)] = slots
        assert cpp.LayerCall(bank, buf)(x, y)

    return impl


@pytest.mark.parametrize("layer", ["qkv-slices", "mixed-family-qkv", "smollm-v_proj-mixed-8"])
@pytest.mark.parametrize("mapping", ["distinct", "mixed-with-none", "runs"])
@pytest.mark.parametrize("num_tokens", [1, 13])
def test_layer_call_matches_kron_reference(cpp, layer, mapping, num_tokens):
    seed = zlib.crc32(f"layer-call/{layer}/{mapping}/{num_tokens}".encode()) % 1000
    run_case(_layer_call(cpp, 40), layer, mapping, num_tokens, torch.float32, seed, pooled=False)


def test_layer_call_follows_a_grown_pack_and_refuses_what_it_cannot_take(cpp, torch_threads):
    """The pack's address is read again when a larger adapter made it grow; a call the kernel
    cannot take returns False and leaves y as it was."""
    layer = "mixed-family-qkv"
    _, _, spec = LAYERS[layer]
    bank = make_bank(layer, 4, torch.float32, seed=21, pooled=False, write=False)
    gen = torch.Generator().manual_seed(22)
    for slot in range(3):  # smaller adapters first (a component left out of each slice)
        bank.write_slot(slot, random_entries(spec, gen, torch.float32, variant=1))
    buf = torch.full((16,), -1, dtype=torch.long)
    buf[:6] = torch.tensor([0, 3, 1, -1, 3, 2])
    call = cpp.LayerCall(bank, buf)
    x = torch.randn(6, bank.in_features, generator=gen)
    y0 = torch.randn(6, bank.out_features, generator=gen)
    y = y0.clone()
    assert call(x, y)  # slot 3 is empty: its rows stay as they were
    assert torch.equal(y[[1, 3, 4]], y0[[1, 3, 4]])
    before = bank.cpu.packed
    # more factors than any slot held: the pack is reallocated
    bank.write_slot(3, random_entries(spec, gen, torch.float32, variant=0))
    assert bank.cpu.packed is not before
    y = y0.clone()
    assert call(x, y)
    ref = reference(x, y0, buf[:6], bank)
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-4)
    assert torch.equal(y[3], y0[3]) and not torch.equal(y[[1, 4]], y0[[1, 4]])
    for bad_x, bad_y in [
        (x.bfloat16(), y0.clone()),  # not float32
        (x[None], y0.clone()[None]),  # not 2-D
        (x[:, :-1], y0.clone()),  # not the bank's width
        (torch.randn(bank.in_features, 6).t(), y0.clone()),  # columns with a stride
        (torch.randn(17, bank.in_features), torch.zeros(17, bank.out_features)),  # > buffer
    ]:
        kept = bad_y.clone()
        assert not call(bad_x, bad_y)
        assert torch.equal(bad_y, kept)
    torch_threads(2)  # a batch past MAX_TOKENS goes to torch's threads
    big = cpp.LayerCall(bank, torch.full((cpp.MAX_TOKENS + 1,), -1, dtype=torch.long))
    assert not big(torch.zeros(cpp.MAX_TOKENS + 1, bank.in_features),
                   torch.zeros(cpp.MAX_TOKENS + 1, bank.out_features))  # fmt: skip
    for bank_, slots_ in [
        (make_bank(layer, 2, torch.float32, seed=1), buf),  # pooled: the torch path's
        (make_bank(layer, 2, torch.bfloat16, seed=1, pooled=False), buf),  # rounds x first
        (bank, buf.int()),
    ]:
        with pytest.raises(ValueError):
            cpp.LayerCall(bank_, slots_)


def test_cached_plans_are_reused_and_stay_correct_across_calls():
    """Calls with the same token count reuse one plan (buffers and views), and a second call
    with other inputs is still right (nothing of the first call leaks through the buffers)."""
    bank = make_bank(next(iter(LAYERS)), 4, torch.float64, seed=3, same_shapes=True)
    gen = torch.Generator().manual_seed(4)
    slots = torch.tensor([0, 1, 2, 1, 0])
    for _ in range(2):
        x = torch.randn(5, bank.in_features, generator=gen, dtype=torch.float64)
        y0 = torch.randn(5, bank.out_features, generator=gen, dtype=torch.float64)
        y = y0.clone()
        moka_apply_torch(x, y, slots, bank)
        assert torch.allclose(y, reference(x, y0, slots, bank), rtol=0, atol=1e-10)
    assert set(bank.cpu.plans) == {"scratch", (bank.cpu.shape_key[0], 5)}
    scratch = bank.cpu.plans["scratch"][0]
    moka_apply_torch(x[:3], y[:3], slots[:3], bank)  # a smaller batch shares the buffers
    assert bank.cpu.plans["scratch"][0] is scratch and len(bank.cpu.plans) == 3


def test_rewritten_slots_regroup_and_packed_buffer_grows():
    """A slot rewritten with other shapes leaves its old group; growing the packed buffer for a
    larger adapter keeps the other slots' factors."""
    layer = next(iter(LAYERS))
    in_features, widths, spec = LAYERS[layer]
    bank = make_bank(layer, 4, torch.float64, seed=9, same_shapes=False)
    gen = torch.Generator().manual_seed(10)
    keys = list(bank.cpu.shape_key)
    bank.write_slot(1, random_entries(spec, gen, torch.float64, variant=0))
    assert bank.cpu.shape_key[1] == keys[0] != keys[1]
    bank.clear_slot(2)
    assert bank.cpu.shape_key[2] == -1 and bank.cpu.packed_numel[2] == 0
    slots = torch.tensor([0, 1, 1, 0, 2, -1, 1])
    x = torch.randn(7, in_features, generator=gen, dtype=torch.float64)
    y0 = torch.randn(7, sum(widths), generator=gen, dtype=torch.float64)
    y = y0.clone()
    moka_apply_torch(x, y, slots, bank)
    ref = reference(x, y0, slots, bank)
    assert torch.allclose(y, ref, rtol=0, atol=1e-10)
    assert torch.equal(y[4:6], y0[4:6])  # the cleared slot and slot -1: untouched


def test_slot_images_built_together_write_what_each_layer_writes_alone():
    """A loader packs all of an adapter's layers at once (``slot_images`` over banks of several
    dtypes and forms); each slot then holds exactly what ``write_slot`` writes for that layer
    alone, pool regions that do not start at 0 included (slots 0 and 1 are taken)."""
    gen = torch.Generator().manual_seed(21)
    forms = [(torch.float32, False), (torch.bfloat16, True), (torch.float64, True)]
    items, twins = [], []
    for layer in LAYERS:
        for dtype, pooled in forms:
            bank, twin = (make_bank(layer, 3, dtype, seed=5, pooled=pooled) for _ in range(2))
            entries = random_entries(LAYERS[layer][2], gen, dtype, variant=1)
            items.append((bank, entries, bank.check_entries(entries)))
            twin.write_slot(2, entries)
            twins.append(twin)
    for (bank, _, _), image in zip(items, slot_images(items), strict=True):
        bank.write_image(2, image)
    for (bank, _, _), twin in zip(items, twins, strict=True):
        assert torch.equal(bank.table, twin.table) and bank.regions == twin.regions
        if bank.pool is not None:
            start, n = bank.regions[2]
            assert start > 0 and torch.equal(
                bank.pool[start : start + n], twin.pool[start : start + n]
            )
        if bank.cpu is not None:
            n = bank.cpu.packed_numel[2]
            assert n > 0 and torch.equal(bank.cpu.packed[2, :n], twin.cpu.packed[2, :n])
        assert torch.equal(delta_weight(bank, 2), delta_weight(twin, 2))
    for bank, entries, shapes in items:  # and what the entries say, read off the bank's table
        want = torch.zeros(bank.out_features, bank.in_features, dtype=torch.float64)
        for e, s in zip(entries, shapes, strict=True):
            a = torch.eye(s.m1, dtype=torch.float64) if e.a is None else e.a.double().cpu()
            b = e.b.double().cpu()
            rows = slice(s.out_offset, s.out_offset + s.m1 * s.m2)
            cols = slice(s.in_offset, s.in_offset + s.n1 * s.n2)
            want[rows, cols] += a @ b if s.low_rank else torch.kron(a, b)
        assert torch.allclose(delta_weight(bank, 2).cpu(), want, rtol=1e-12, atol=1e-12)


def _triton(form):
    def impl(x, y, slots, bank):
        triton_ops.moka_apply_triton(
            x, y, slots, bank, form=form, blocks=(16, 16) if form == "prefill" else None
        )

    return impl


@pytest.mark.parametrize(
    "layer",
    ["mixed-48x40", "qkv-slices", "smollm-v_proj", "mixed-family-qkv", "smollm-v_proj-mixed-8"],
)
@pytest.mark.parametrize("mapping", ["mixed-with-none", "runs", "all-none"])
@pytest.mark.parametrize("form", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_kron_reference(layer, mapping, form, dtype):
    run_case(
        _triton(form), layer, mapping, num_tokens=9 if form == "decode" else 37, dtype=dtype, seed=7
    )


@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_triton_bf16_and_identity_only_layer(form):
    run_case(
        _triton(form), "smollm-q_proj", "identical", num_tokens=5, dtype=torch.bfloat16, seed=3
    )


@pytest.mark.parametrize(
    "impl", [moka_apply_naive, moka_apply_torch, _triton("decode"), _triton("prefill")]
)
def test_empty_batch(impl):
    bank = make_bank("mixed-48x40", 2, torch.float32, 0)
    y = torch.empty(0, 40, device=DEVICE)
    impl(
        torch.empty(0, 48, device=DEVICE), y, torch.empty(0, dtype=torch.long, device=DEVICE), bank
    )
    assert y.shape == (0, 40)


def test_group_starts_partition_each_slot_run():
    slots = torch.tensor([2, -1, 0, 2, 2, 0, -1, 2, 2, 2, 1, 2, 2, 2, 2])
    order, sorted_slots, starts = triton_ops.group_starts(slots, block_t=4, num_slots=3)
    assert torch.equal(slots[order.long()], sorted_slots)
    starts = [s for s in starts.tolist() if s < len(slots)]
    # slot order with -1 last; groups start where a slot's run starts, then every 4 tokens
    assert sorted_slots.tolist() == [0, 0, 1] + [2] * 10 + [-1, -1]
    assert starts == [0, 2, 3, 7, 11, 13]


@pytest.mark.parametrize("num_tokens", [3, 40, 150])
def test_step_plan_prefixes_serve_padded_layers(num_tokens):
    """One plan per step (MokaKernelMeta, over a buffer padded with -1) applied by layers that
    see more rows than the step has tokens, in both kernel forms: equal to the reference, and
    padded rows untouched."""
    from moka_serve.plugin.kernel_metadata import MokaKernelMeta

    bank = make_bank("qkv-slices", 3, torch.float32, seed=21)
    meta = MokaKernelMeta(256, bank.num_slots, DEVICE, triton=True)
    gen = torch.Generator().manual_seed(22)
    slots = torch.randint(-1, bank.num_slots, (num_tokens,), generator=gen)
    meta.update(slots.to(DEVICE))
    meta.update(slots.to(DEVICE))  # a second step with the same mapping rewrites in place
    for rows in (num_tokens, num_tokens + 5):  # the layer's x.size(0), padded or not
        x = torch.randn(rows, bank.in_features, generator=gen).to(DEVICE)
        y0 = torch.randn(rows, bank.out_features, generator=gen).to(DEVICE)
        y = y0.clone()
        plan = meta.triton_plan(rows)
        assert plan.block_t == triton_ops.choose_block_t(rows, bank.num_slots)
        triton_ops.moka_apply_triton(x, y, meta.slots_for(rows), bank, plan=plan)
        padded = torch.cat([slots, torch.full((rows - num_tokens,), -1)]).to(DEVICE)
        assert torch.equal(meta.slots_for(rows), padded)
        check(y, y0, reference(x, y0, padded, bank), padded, bank, torch.float32)


def test_delta_weight_is_sum_of_krons():
    bank = make_bank("qkv-slices", 2, torch.float64, 1)
    delta = delta_weight(bank, 0)
    want = torch.zeros(40, 48, dtype=torch.float64)
    for i, s in enumerate(bank.entries[0]):
        a, b, _ = bank.factors(0, i)
        a = torch.eye(s.m1, dtype=torch.float64) if s.identity_a else a
        for i1 in range(s.m1):  # the definition, element by element
            for j1 in range(s.n1):
                want[
                    s.out_offset + i1 * s.m2 : s.out_offset + (i1 + 1) * s.m2,
                    j1 * s.n2 : (j1 + 1) * s.n2,
                ] += a[i1, j1] * b
    assert torch.allclose(delta, want, atol=1e-12)


def test_grouped_rank_one_terms_are_the_same_update():
    """``group_rank_one`` stacks a slice's rank-1 terms (both orientations, (m,1)x(1,n) and
    (1,n)x(m,1)) into one low-rank entry per slice, keeps the other terms, and the bank's dense
    update equals the ungrouped terms' ``torch.kron`` sum."""
    from moka_kernels.bank import group_rank_one

    gen = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    terms = [
        KronEntry(a=rnd(5, 6), b=rnd(8, 8)),
        KronEntry(a=rnd(40, 1), b=rnd(1, 48)),
        KronEntry(a=rnd(1, 48), b=rnd(40, 1)),  # the same outer product, transposed roles
        KronEntry(b=rnd(10, 12), identity_size=4),
        KronEntry(a=rnd(24, 1), b=rnd(1, 48), slice=1),
        KronEntry(a=rnd(40, 1), b=rnd(1, 48)),
    ]
    grouped = group_rank_one(terms)
    assert [(e.slice, e.rank, e.a is None) for e in grouped] == [
        (0, 1, False), (0, 3, False), (0, 1, True), (1, 1, False)
    ]  # fmt: skip
    want = torch.zeros(64, 48, dtype=torch.float64)
    for e in terms:
        a = torch.eye(e.identity_size, dtype=torch.float64) if e.a is None else e.a
        want[e.slice * 40 : e.slice * 40 + a.shape[0] * e.b.shape[0]] += torch.kron(a, e.b)
    bank = MokaBank(1, 4, 48 * 40, 48 * 40, 48, 64, torch.float64, "cpu", [40, 24])
    bank.write_slot(0, grouped)
    assert [s.low_rank for s in bank.entries[0]] == [False, True, False, True]
    assert bank.entries[0][1].numel == 3 * (40 + 48)
    assert torch.allclose(delta_weight(bank, 0), want, atol=1e-12)
    x = rnd(7, 48)
    for impl in (moka_apply_torch, moka_apply_naive):
        y = torch.zeros(7, 64, dtype=torch.float64)
        impl(x, y, torch.zeros(7, dtype=torch.long), bank)
        assert torch.allclose(y, x @ want.T, atol=1e-10)


def test_bank_rejects_entries_that_do_not_fit():
    bank = MokaBank(2, 2, 32, 64, 48, 40)
    with pytest.raises(ValueError, match="exceed in_features 48"):
        bank.write_slot(0, [KronEntry(a=torch.ones(5, 7), b=torch.ones(8, 8))])
    with pytest.raises(ValueError, match="exceed in_features 48"):  # a sharded term's columns
        bank.write_slot(0, [KronEntry(a=torch.ones(5, 5), b=torch.ones(8, 8), in_offset=9)])
    with pytest.raises(ValueError, match="exceed width 40"):
        bank.write_slot(0, [KronEntry(a=torch.ones(2, 16), b=torch.ones(21, 3))])
    with pytest.raises(ValueError, match="exceed width 40"):
        bank.write_slot(0, [KronEntry(a=torch.ones(4, 6), b=torch.ones(8, 8), out_offset=9)])
    with pytest.raises(ValueError, match="limit of 2"):
        bank.write_slot(0, [KronEntry(a=torch.ones(5, 6), b=torch.ones(8, 8))] * 3)
    with pytest.raises(ValueError, match="buffer holds"):
        bank.write_slot(
            0,
            [
                KronEntry(a=torch.ones(1, 48), b=torch.ones(40, 1)),
                KronEntry(a=torch.ones(40, 1), b=torch.ones(1, 48)),
            ],
        )
    with pytest.raises(ValueError, match="rank-3 entry needs"):
        bank.write_slot(0, [KronEntry(a=torch.ones(40, 2), b=torch.ones(3, 48), rank=3)])


def test_custom_op_under_torch_compile():
    bank = make_bank("mixed-48x40", 3, torch.float32, 5)
    slots = torch.tensor([0, -1, 1, 1, 0], device=DEVICE)
    x = torch.randn(5, 48, device=DEVICE)

    def layer(x, y):
        y = y * 1.0
        triton_ops.moka_apply_triton(x, y, slots, bank, form="decode")
        return y + 0.0

    y0 = torch.randn(5, 40, device=DEVICE)
    want = layer(x, y0.clone())
    got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, y0.clone())
    assert torch.equal(got, want)


def test_moka_kernels_imports_with_torch_alone():
    """The kernels package must not pull in vLLM, transformers or triton at import."""
    import subprocess
    import sys

    code = (
        "import sys, moka_kernels; "
        "bad = [m for m in ('vllm', 'transformers', 'triton', 'safetensors') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_custom_op_under_cuda_graph_capture_and_replay():
    bank = make_bank("smollm-v_proj", 4, torch.bfloat16, 11)
    x = torch.randn(8, 576, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(8, 192, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([0, 1, -1, 2, 0, 0, 1, -1], device="cuda")
    triton_ops.moka_apply_triton(x, y, slots, bank)  # warm-up compiles outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        triton_ops.moka_apply_triton(x, y, slots, bank)
    for step in range(3):  # new inputs, new mapping and a rewritten slot, all in place
        x.copy_(torch.randn_like(x))
        slots.copy_(torch.tensor([step % 3, -1, 1, 2, 0, step % 3, 1, 0]))
        gen = torch.Generator().manual_seed(step)
        bank.write_slot(1, random_entries(LAYERS["smollm-v_proj"][2], gen, torch.bfloat16, step))
        graph.replay()
        want = torch.zeros(8, 192, dtype=torch.float64, device="cuda")
        moka_apply_naive(x.double(), want, slots, bank)
        assert (y.double() - want).abs().max() / want.abs().max() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the shipped tiles need a GPU")
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("mapping", ["mixed-with-none", "runs", "distinct"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [9, 300])  # decode and prefill form under "auto"
def test_triton_shipped_tiles_half_precision(layer, mapping, dtype, num_tokens):
    """The shipped DECODE_BLOCKS / PREFILL_BLOCKS and half-precision ``tl.dot`` (the CPU
    interpreter forces fp32 dots and the tests above override the prefill tiles)."""
    impl = triton_ops.moka_apply_triton  # form="auto", blocks=None: exactly what serving runs
    run_case(impl, layer, mapping, num_tokens=num_tokens, dtype=dtype, seed=num_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_over_a_layer_stack_with_step_metadata():
    """Four MoKA-adapted linear layers (base GEMM + kernel with the step's plan) captured once
    in a CUDA graph, replayed while the mapping changes (MokaKernelMeta.update, in place) and
    slots are rewritten with other shapes between replays, on a batch padded past the step's
    tokens: every replay equals the float64 reference of the current mapping and factors."""
    from moka_serve.plugin.kernel_metadata import MokaKernelMeta

    layer_name, dtype, rows, num_slots = "smollm-v_proj", torch.bfloat16, 24, 4
    in_features, widths, spec = LAYERS[layer_name]
    gen = torch.Generator().manual_seed(31)
    banks = [make_bank(layer_name, num_slots, dtype, seed=40 + i) for i in range(4)]
    weights = [
        (torch.randn(sum(widths), in_features, generator=gen) / in_features**0.5).to(dtype).cuda()
        for _ in banks
    ]
    meta = MokaKernelMeta(64, num_slots, "cuda")
    x = torch.randn(rows, in_features, generator=gen).to(dtype).cuda()
    outs = [torch.zeros(rows, sum(widths), dtype=dtype, device="cuda") for _ in banks]

    def step():
        for w, bank, y in zip(weights, banks, outs, strict=True):
            y.copy_(x @ w.T)
            triton_ops.moka_apply_triton(
                x, y, meta.slots_for(rows), bank, plan=meta.triton_plan(rows)
            )

    meta.update(torch.tensor([0, 1, -1, 2] * 5, device="cuda"))
    step()  # compiles the kernels outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for k in range(3):
        n_step = 20 - 3 * k  # the step's tokens; rows past them are padding
        slots = torch.randint(-1, num_slots - 1, (n_step,), generator=gen)
        meta.update(slots.cuda())
        banks[k].write_slot(1, random_entries(spec, gen, dtype, variant=k + 1))
        x.copy_(torch.randn(rows, in_features, generator=gen).to(dtype))
        graph.replay()
        padded = torch.cat([slots, torch.full((rows - n_step,), -1)])
        for w, bank, y in zip(weights, banks, outs, strict=True):
            want = (x.double() @ w.double().T).cpu()
            moka_apply_naive(x.double().cpu(), want, padded, _cpu_copy(bank))
            err = (y.double().cpu() - want).abs().max() / want.abs().max()
            assert err < 3e-2, f"replay {k}: relative error {err:.3g}"


def _cpu_copy(bank: MokaBank) -> MokaBank:
    """The bank's factors on the CPU (the naive reference reads host-side views)."""
    copy = MokaBank(
        bank.num_slots, bank.max_entries, bank.max_a_numel, bank.max_b_numel, bank.in_features,
        bank.out_features, torch.float64, "cpu", bank.slice_widths,
    )  # fmt: skip
    for slot in range(bank.num_slots):
        entries = []
        for a, b, s in bank.slot_views(slot):
            entries.append(
                KronEntry(
                    b=b.double().cpu(), a=None if a is None else a.double().cpu(), slice=s.slice
                )
            )
        copy.write_slot(slot, entries)
    return copy


def test_slot_written_in_inference_mode_can_be_rewritten_outside_it():
    """vLLM activates an adapter inside the engine step (inference mode) after an eviction, and
    outside it when ``add_lora`` loads one: a buffer grown in the first case used to be an
    inference tensor, and the next ``add_lora`` failed writing it ("Inplace update to inference
    tensor outside InferenceMode")."""
    bank = MokaBank(2, 2, 256, 256, 48, 40, torch.float32, "cpu")
    small = [KronEntry(a=torch.ones(2, 3), b=torch.ones(4, 4))]
    big = [KronEntry(a=torch.ones(5, 6), b=torch.ones(8, 8))]
    bank.write_slot(0, small)
    with torch.inference_mode():
        bank.write_slot(1, big)  # grows the CPU path's packed buffer
    bank.write_slot(0, big)
    bank.write_slot(1, small)
    x = torch.randn(3, 48)
    y, want = torch.zeros(3, 40), torch.zeros(3, 40)
    slots = torch.tensor([0, 1, 0])
    moka_apply_torch(x, y, slots, bank)
    moka_apply_naive(x, want, slots, bank)
    assert torch.allclose(y, want, atol=1e-5)


def _entries_of(gen: torch.Generator, sizes: list[tuple[int, int, int, int]]) -> list[KronEntry]:
    return [
        KronEntry(
            a=torch.randn(m1, n1, generator=gen, dtype=torch.float64),
            b=torch.randn(m2, n2, generator=gen, dtype=torch.float64),
        )
        for m1, n1, m2, n2 in sizes
    ]


def _dense(entries: list[KronEntry]) -> torch.Tensor:
    """The float64 ``sum kron(A, B)`` of whole-layer entries (the definition)."""
    return sum(torch.kron(e.a, e.b) for e in entries)


# Adapters for a 48 -> 40 layer of very different pool sizes (elements: 46, 104, 1960, 2040).
POOL_ADAPTERS = [
    [(5, 6, 8, 8)],
    [(1, 48, 40, 1), (2, 3, 20, 16)],
    [(40, 48, 1, 1)],
    [(40, 1, 1, 48), (20, 24, 2, 2), (10, 12, 4, 4), (8, 16, 5, 3)],
]


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_pool_holds_adapters_of_different_sizes_through_evictions(impl):
    """Slots written, cleared and rewritten with adapters of very different sizes in one pool
    too small for a worst case of every slot: regions are placed first fit and compacted when
    the free space is fragmented, the pool and table never move (CUDA-graph rule), and every
    slot's delta stays the float64 kron of what was written into it."""
    gen = torch.Generator().manual_seed(5)
    adapters = [_entries_of(gen, spec) for spec in POOL_ADAPTERS]
    numel = [sum(e.a.numel() + e.b.numel() for e in ad) for ad in adapters]
    pool = numel[2] + numel[3] + numel[1] + 10  # the two big ones, a small one and a gap
    bank = MokaBank(3, 4, 48 * 40, 48 * 40, 48, 40, torch.float64, DEVICE, pool_numel=pool,
                    pooled=True)  # fmt: skip
    addresses = (bank.pool.data_ptr(), bank.table.data_ptr())
    held: dict[int, int] = {}
    apply = {"naive": moka_apply_naive, "torch": moka_apply_torch}.get(impl)
    if apply is None:
        apply = triton_ops.moka_apply_triton
    sequence = [(0, 0), (1, 2), (2, 1), (0, 3), (2, 0), (1, 1), (2, 3), (0, 2), (1, 0), (0, 1)]
    compacted = 0
    for slot, which in sequence:
        if slot in held and sum(numel[held[s]] for s in held if s != slot) + numel[which] > pool:
            bank.clear_slot(slot)  # evicted: the other slots must fit with the new one
            del held[slot]
            continue
        before = dict(bank.regions)
        bank.write_slot(slot, adapters[which])
        held[slot] = which
        moved = [s for s in before if s != slot and bank.regions.get(s) != before[s]]
        compacted += bool(moved)
        assert (bank.pool.data_ptr(), bank.table.data_ptr()) == addresses
        starts = sorted(bank.regions.values())
        assert all(a + n <= b for (a, n), (b, _) in zip(starts, starts[1:], strict=False))
        poison_unused(bank)
        x = torch.randn(9, 48, generator=gen, dtype=torch.float64).to(DEVICE)
        slots = torch.tensor([s for s in held for _ in range(3)], device=DEVICE)
        y = torch.zeros(len(slots), 40, dtype=torch.float64, device=DEVICE)
        apply(x[: len(slots)], y, slots, bank)
        for k, s in enumerate(slots.tolist()):
            want = _dense(adapters[held[s]]) @ x[k].double().cpu()
            tol = 1e-5 if impl == "triton" else 1e-9  # the Triton dots run in fp32
            torch.testing.assert_close(y[k].cpu(), want, rtol=tol, atol=tol * want.abs().max())
    assert compacted >= 1  # the sequence needs at least one compaction


def test_full_pool_is_a_clear_error_and_admission_keeps_it_from_filling():
    gen = torch.Generator().manual_seed(6)
    big, small = _entries_of(gen, [(40, 48, 1, 1)]), _entries_of(gen, [(5, 6, 8, 8)])
    bank = MokaBank(2, 4, 48 * 40, 48 * 40, 48, 40, torch.float64, "cpu", pool_numel=2100,
                    pooled=True)  # fmt: skip
    bank.write_slot(0, big)
    with pytest.raises(ValueError, match="pool is full: 1921 elements needed, 179 of 2100 free"):
        bank.write_slot(1, big)
    with pytest.raises(ValueError, match="its pool holds 2100"):
        bank.check_entries(_entries_of(gen, [(40, 48, 1, 1), (40, 48, 1, 1)]))
    # Admission: any 2 (= slots) admitted adapters must fit together.
    bank.admit("big", 1921)
    bank.admit("small", 104)
    bank.admit("big", 1921)  # again (a reload after eviction): never fails
    with pytest.raises(ValueError, match="2 slots could need 3842 of the pool's 2100"):
        bank.admit("big-2", 1921)
    assert "big-2" not in bank.admitted
    bank.release("big")
    bank.admit("big-2", 1921)
    bank.write_slot(1, small)  # the slots of admitted adapters always fit
