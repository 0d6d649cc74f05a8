"""The CPU path's kernel (``cpu_kernel.cpp``): built on first use, called by ctypes.

A decode step on CPU gives each adapted layer a handful of tokens; the torch path
(``torch_ops.py``) then spends more time calling ops than multiplying. :func:`moka_apply_cpp`
does the same arithmetic in one C call per layer: for every token its slot's entries, straight
from the bank's table and the CPU pack, no gather, no intermediate tensors. It has the signature
of every kernel here and is compared with float64 ``torch.kron`` (``naive.py``) by the tests.

It runs on one thread. Where torch does too (vLLM's CPU worker on a 2-core machine) it takes
every batch, prefill chunks included: measured faster than the torch path at every size up to
2048 tokens, 2-13x on a prefill chunk beside other requests' decode tokens (docs/benchmarks.md).
With more torch threads it takes batches of up to :data:`MAX_TOKENS` tokens and the torch
path's multi-threaded GEMMs take larger ones (:func:`takes`).

The library is compiled from the project's own source with the system's C++ compiler (``c++``
or ``$CXX``; no torch headers, about a second) into a cache folder, once per source, flags and
CPU, and loaded with ``ctypes``. :func:`load` reports why it could not build instead of
raising: callers then keep the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .bank import NUM_FIELDS, MokaBank, check_apply_args

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
VERSION = 3  # moka_cpu_kernel_version() of the source above
# -march=native: the library is built on the machine that runs it (the CPU's flags are part of
# its cache key, so a cache shared between machines never hands one another's build).
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=c++17"]
# With more than one torch thread, batches above this many tokens (prefill chunks) go to the
# torch path's multi-threaded GEMMs; on one thread the kernel takes every batch (:func:`takes`).
MAX_TOKENS = 64

_lib: ctypes.CDLL | None = None
# The same function through ``ctypes.PyDLL``: it keeps the GIL for the call (the kernel never
# calls Python), for :class:`LayerCall`'s per-step calls.
_apply_holding_gil = None
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(cache_dir: Path, compiler: str) -> Path:
    key = hashlib.sha256(
        b"\0".join(
            [SOURCE.read_bytes(), " ".join([compiler, *FLAGS]).encode(), _cpu_flags().encode()]
        )
    ).hexdigest()[:16]
    return cache_dir / f"moka_cpu_kernel_{key}.so"


def find_compiler() -> str:
    """``$CXX``, else ``c++`` or ``g++`` on the PATH; ``RuntimeError`` when there is none."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (c++, g++ or $CXX)")
    return compiler


def build(cache_dir: Path) -> Path:
    """The compiled library for this machine under ``cache_dir``, compiled if missing.
    ``RuntimeError`` saying why when it cannot be."""
    compiler = find_compiler()
    out = library_path(cache_dir, compiler)
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name, then renamed: workers building at once never load half a file.
    fd, tmp = tempfile.mkstemp(prefix=".moka_cpu_kernel.", suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def open_library(cache_dir: Path) -> ctypes.CDLL:
    """The built library, opened; a cached file that does not open (cut short by a full disk,
    say) is built again once."""
    path = build(cache_dir)
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(build(cache_dir)))


def load(cache_dir: Path) -> str | None:
    """Build (if needed) and load the library for this process; None when it is ready, else
    why not (the torch path then stays in use)."""
    global _lib, _apply_holding_gil
    if _lib is not None:
        return None
    try:
        lib = open_library(cache_dir)
        if lib.moka_cpu_kernel_version() != VERSION:
            return f"the built library is version {lib.moka_cpu_kernel_version()}, not {VERSION}"
        if lib.moka_cpu_kernel_fields() != NUM_FIELDS:
            return (
                f"the library reads {lib.moka_cpu_kernel_fields()} table fields, not {NUM_FIELDS}"
            )
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"the CPU kernel could not be built or loaded: {e}"
    lib.moka_apply_f32.restype = None
    lib.moka_apply_f32.argtypes = _ARGTYPES
    holding_gil = ctypes.PyDLL(lib._name).moka_apply_f32
    holding_gil.restype = None
    holding_gil.argtypes = _ARGTYPES
    _lib, _apply_holding_gil = lib, holding_gil
    return None


def loaded() -> bool:
    return _lib is not None


def bank_supported(bank: MokaBank) -> bool:
    """Whether the kernel can read ``bank``: its factors live in the CPU pack (an unpooled bank,
    what the plugin builds on CPU), float32 whatever the bank's dtype (see ``CpuPack``)."""
    return bank.pool is None and bank.cpu is not None and bank.cpu.packed.dtype == torch.float32


def takes(num_tokens: int) -> bool:
    """Whether a batch of ``num_tokens`` is the kernel's: up to :data:`MAX_TOKENS`, or any size
    when torch runs on one thread (the kernel's own one thread then beats the torch path's GEMMs
    at every size measured)."""
    return num_tokens <= MAX_TOKENS or torch.get_num_threads() == 1


def supports(x: torch.Tensor, bank: MokaBank) -> bool:
    """Whether :func:`moka_apply_cpp` can take this call: the library is loaded, the batch is
    the kernel's (:func:`takes`) and :func:`bank_supported`."""
    return (
        _lib is not None and x.device.type == "cpu" and takes(x.shape[0]) and bank_supported(bank)
    )


@torch.no_grad()
def moka_apply_cpp(
    x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, bank: MokaBank
) -> None:
    """``y[t] += delta_W[slot[t]] @ x[t]`` for every token whose slot is not -1 (needs
    :func:`supports`). ``x`` and ``y`` of other dtypes are converted as the torch path does:
    x rounded to the bank's dtype, products in float32, added into y once per token."""
    check_apply_args(x, y, token_slots, bank)
    if not supports(x, bank):
        raise RuntimeError("moka_apply_cpp: the library is not loaded or cannot take this call")
    run(x, y, token_slots, bank)


def run(x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, bank: MokaBank) -> None:
    """:func:`moka_apply_cpp` without its checks and grad mode, for a caller that made them
    (the plugin's layers, once per adapted layer and step, under vLLM's inference mode): on a
    decode step these few microseconds are a fair part of the call."""
    n = x.shape[0]
    if n == 0:
        return
    if x.dtype != torch.float32 or bank.dtype != torch.float32:
        x = x.to(bank.dtype).to(torch.float32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    direct = y.dtype == torch.float32 and y.stride(-1) == 1
    out = y if direct else torch.zeros(n, bank.out_features, dtype=torch.float32)
    if token_slots.dtype != torch.int64 or not token_slots.is_contiguous():
        token_slots = token_slots.long().contiguous()
    packed, table = bank.cpu.packed, bank.table
    _lib.moka_apply_f32(
        n, x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), token_slots.data_ptr(),
        packed.data_ptr(), packed.stride(0), table.data_ptr(), table.shape[1],
    )  # fmt: skip
    if not direct:
        y.add_(out.to(y.dtype))


class LayerCall:
    """:func:`run` for one adapted layer of an engine, with what stays fixed read once.

    In a serving step each adapted layer calls the kernel once, right after the model's weights
    for that layer went through the caches: every Python-side step of the call then runs cold
    (in the measurement of docs/benchmarks.md, 18 us for :func:`run`'s argument gathering and
    ``ctypes`` call against 8 for this one). The bank's table and pack pointers and the step's
    slot buffer (``token_slots``, preallocated for ``max_tokens`` rows with -1 past the step's)
    are read when the pack was last seen (it grows by reallocation, so its identity is checked
    per call); per call only ``x`` and ``y`` are read.
    """

    def __init__(self, bank: MokaBank, token_slots: torch.Tensor) -> None:
        if not bank_supported(bank) or bank.dtype != torch.float32:
            raise ValueError("the kernel reads float32 banks only through this call")
        if token_slots.dtype != torch.int64:
            raise ValueError("the slot buffer must be int64")
        if not token_slots.is_contiguous():
            raise ValueError("the slot buffer must be contiguous")
        self.bank = bank
        self.token_slots = token_slots  # kept alive: the kernel reads it by address
        self._slots_ptr = token_slots.data_ptr()
        self.max_tokens = token_slots.shape[0]
        self.in_features = bank.in_features
        self.out_features = bank.out_features
        self._packed: torch.Tensor | None = None
        self._fixed: tuple = ()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Add the step's MoKA delta for the rows of ``x`` (2-D) into ``y`` in place; False,
        touching nothing, when the kernel cannot take the call (the caller then takes another
        path): not loaded, not float32 rows, too many tokens (:func:`takes`), or shapes that
        are not the bank's."""
        shape = x.shape
        if _apply_holding_gil is None or len(shape) != 2 or shape[0] > self.max_tokens:
            return False
        n = shape[0]
        if n == 0:
            return True
        if x.dtype != torch.float32 or y.dtype != torch.float32 or not takes(n):
            return False
        xs, ys = x.stride(), y.stride()
        if (shape[1] != self.in_features or xs[1] != 1 or ys[1] != 1
                or y.shape != (n, self.out_features)):  # fmt: skip
            return False
        packed = self.bank.cpu.packed
        if packed is not self._packed:
            table = self.bank.table
            self._fixed = (packed.data_ptr(), packed.stride(0), table.data_ptr(), table.shape[1])
            self._packed = packed
        pack_ptr, pack_stride, table_ptr, max_entries = self._fixed
        _apply_holding_gil(
            n, x.data_ptr(), xs[0], y.data_ptr(), ys[0], self._slots_ptr,
            pack_ptr, pack_stride, table_ptr, max_entries,
        )  # fmt: skip
        return True
